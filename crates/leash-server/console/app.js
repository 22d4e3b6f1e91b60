// placeholder: replaced by the console branch
