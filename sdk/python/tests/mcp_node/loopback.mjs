// Preloaded (`node --import ./loopback.mjs ...`) into an unmodified server that listens on a port
// with no host (server-everything's `app.listen(PORT)`, which would take every interface): such a
// listen binds 127.0.0.1 instead, and the port actually taken (PORT=0: any free one) is printed
// on stdout as one line, `listening on <port>`.
import net from "node:net";

const listen = net.Server.prototype.listen;
const isPort = (value) =>
  typeof value === "number" || (typeof value === "string" && /^\d+$/.test(value));

net.Server.prototype.listen = function (...args) {
  if (isPort(args[0]) && typeof args[1] !== "string") {
    args.splice(1, 0, "127.0.0.1");
    this.once("listening", () => {
      process.stdout.write(`listening on ${this.address().port}\n`);
    });
  }
  return listen.apply(this, args);
};
