//! Opening what a user names for reading (pictures, model files, datasets,
//! question and config files): regular files only. A FIFO blocks the open
//! (and then the read) until a writer comes, which may be never, and a
//! device such as `/dev/zero` never ends; both are refused before a byte
//! is read, with what the path is instead.
//!
//! The path is looked at with `stat`, which never blocks, then opened with
//! `O_NONBLOCK` and looked at again through the open file, so a path
//! swapped for a FIFO in between is refused too (`O_NONBLOCK` does nothing
//! to reads of a regular file).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::Path;

/// What a path is, when it is not a regular file.
fn kind(meta: &Metadata) -> &'static str {
    let file_type = meta.file_type();
    if file_type.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    "not a file"
}

fn refuse(meta: &Metadata) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file ({})", kind(meta)),
    )
}

/// The metadata of `path` (links followed) if it is a regular file; an
/// error saying what it is otherwise. Opens nothing.
pub fn check(path: &Path) -> io::Result<Metadata> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    Ok(meta)
}

/// Opens `path` for reading if it is a regular file, with its metadata.
pub fn open(path: &Path) -> io::Result<(File, Metadata)> {
    check(path)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refuse(&meta));
    }
    Ok((file, meta))
}

/// The whole of a regular file of at most `max_bytes`.
pub fn read(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let (file, meta) = open(path)?;
    let too_big = |size: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{size} bytes, more than the {max_bytes} such a file may have"),
        )
    };
    if meta.len() > max_bytes {
        return Err(too_big(meta.len()));
    }
    // The file may grow after the stat: read one byte past the limit at most.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// As [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, max_bytes: u64) -> io::Result<String> {
    String::from_utf8(read(path, max_bytes)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_to_string(&file, 5).unwrap(), "hello");
        let err = read(&file, 4).unwrap_err().to_string();
        assert!(err.contains("5 bytes, more than the 4"), "{err}");

        let err = open(dir.path()).unwrap_err().to_string();
        assert_eq!(err, "not a regular file (a directory)");
        let err = open(Path::new("/dev/zero")).unwrap_err().to_string();
        assert_eq!(err, "not a regular file (a character device)");
        let err = open(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);

        // A FIFO with no writer: refused at once, not waited on.
        let fifo = dir.path().join("fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = read(&fifo, 10).unwrap_err().to_string();
        assert_eq!(err, "not a regular file (a FIFO)");

        std::fs::write(&file, b"ok \xff").unwrap();
        let err = read_to_string(&file, 10).unwrap_err().to_string();
        assert!(err.contains("not UTF-8 text (byte 3)"), "{err}");
    }
}
