//! Files only their owner may read (mode 0600): the master key the server creates on first
//! start, and the agent keys and saved tokens the `leash` client writes.

use std::io::Write as _;
use std::path::Path;

/// What [`write_private`] does when the file exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfExists {
    /// Fail and leave it as it is: a key that exists is never overwritten, even by a second
    /// writer racing this one.
    Fail,
    /// Replace its contents and make it private again, whatever mode it had.
    Replace,
}

/// Writes `contents` to `path` as a file readable and writable by its owner only, and syncs it
/// to disk before returning.
pub fn write_private(path: &Path, contents: &[u8], if_exists: IfExists) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    match if_exists {
        IfExists::Fail => options.create_new(true),
        IfExists::Replace => options.create(true).truncate(true),
    };
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    // The mode above applies only to a file this call creates.
    #[cfg(unix)]
    if if_exists == IfExists::Replace {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_created_once_or_replaced_and_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_private(&path, b"first", IfExists::Fail).unwrap();
        assert!(write_private(&path, b"second", IfExists::Fail).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        #[cfg(unix)]
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        write_private(&path, b"2nd", IfExists::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"2nd");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
