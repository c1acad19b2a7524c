//! A fragment's checkpoints on a local disk: one append-only file per
//! fragment and key, each checkpoint a piece of it.
//!
//! One file instead of a file per range: creating a file is the dearest
//! step of a small range task's checkpoint (ext4 without a journal scans
//! past every inode freed in the last minutes to find a free one), and a
//! fragment split into eight tasks made eight files, their directory, and
//! a rename each.
//!
//! A piece is a 32-byte header (magic, start, end, length, CRC-32 of the
//! bytes) and the bytes. Appends hold the file's exclusive lock, reads its
//! shared lock, so no reader sees a piece half written. A writer killed
//! mid-append leaves a short piece at the end: readers stop before it, and
//! the next append cuts it off first.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::Range;

const MAGIC: &[u8; 4] = b"LBCK";
const HEADER: u64 = 32;

/// A whole piece: its range and where its bytes are.
#[derive(Debug, Clone, Copy)]
struct Piece {
    range: Range,
    offset: u64,
    len: u64,
    crc: u32,
}

/// Appends `bytes` as the checkpoint of `range`.
pub(super) fn append(path: &Path, range: Range, bytes: &[u8]) -> std::io::Result<()> {
    let file = open_for_append(path)?;
    file.lock()?;
    let (_, end, size) = pieces(&file)?;
    // What follows the last whole piece is one a killed writer left.
    if size > end {
        file.set_len(end)?;
    }
    let mut header = Vec::with_capacity(HEADER as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&range.start.to_le_bytes());
    header.extend_from_slice(&range.end.to_le_bytes());
    header.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    // Two writes rather than a copy of the bytes behind the header: a
    // header without all its bytes is a short piece like any other.
    file.write_all_at(&header, end)?;
    file.write_all_at(bytes, end + HEADER)
}

/// The file, made (with its directory) if there is none.
fn open_for_append(path: &Path) -> std::io::Result<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    };
    match open() {
        Err(err) if err.kind() == ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            open()
        }
        opened => opened,
    }
}

/// The ranges checkpointed (none if there is no file), in the order written.
pub(super) fn ranges(path: &Path) -> std::io::Result<Vec<Range>> {
    let Some(file) = open_shared(path)? else {
        return Ok(Vec::new());
    };
    Ok(pieces(&file)?.0.iter().map(|p| p.range).collect())
}

/// The bytes of the last checkpoint of exactly each of `ranges`, in order:
/// the first always, the next ones while their bytes stay within `budget`.
/// One open and one pass over the headers for all of them.
pub(super) fn read(
    path: &Path,
    ranges: &[Range],
    budget: u64,
) -> std::io::Result<Vec<(Range, Vec<u8>)>> {
    let missing = |range: &Range| {
        std::io::Error::new(
            ErrorKind::NotFound,
            format!("no checkpoint {}-{}", range.start, range.end),
        )
    };
    let Some(file) = open_shared(path)? else {
        return match ranges.first() {
            Some(range) => Err(missing(range)),
            None => Ok(Vec::new()),
        };
    };
    let (pieces, _, _) = pieces(&file)?;
    let (mut read, mut taken) = (Vec::new(), 0u64);
    for range in ranges {
        let piece = pieces
            .iter()
            .rev()
            .find(|p| p.range == *range)
            .ok_or_else(|| missing(range))?;
        if !read.is_empty() && taken + piece.len > budget {
            break;
        }
        read.push((*range, piece_bytes(&file, piece)?));
        taken += piece.len;
    }
    Ok(read)
}

/// A piece's bytes, checked against its checksum.
fn piece_bytes(file: &File, piece: &Piece) -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0; piece.len as usize];
    file.read_exact_at(&mut bytes, piece.offset)?;
    if crc32fast::hash(&bytes) != piece.crc {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "checkpoint {}-{} does not match its checksum",
                piece.range.start, piece.range.end
            ),
        ));
    }
    Ok(bytes)
}

/// Removes the file (no error if it is gone already).
pub(super) fn remove(path: &Path) -> std::io::Result<()> {
    unless_missing(std::fs::remove_file(path)).map(drop)
}

/// Removes a directory of files (no error if it is gone already).
pub(super) fn remove_directory(dir: &Path) -> std::io::Result<()> {
    unless_missing(std::fs::remove_dir_all(dir)).map(drop)
}

/// The file, under its shared lock; `None` if there is none.
fn open_shared(path: &Path) -> std::io::Result<Option<File>> {
    let Some(file) = unless_missing(File::open(path))? else {
        return Ok(None);
    };
    file.lock_shared()?;
    Ok(Some(file))
}

/// `None` for what is not there, the error for any other failure.
fn unless_missing<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// The whole pieces, where the last one ends, and the file's size. Each
/// header is read on its own (the bytes between are skipped, not read).
fn pieces(file: &File) -> std::io::Result<(Vec<Piece>, u64, u64)> {
    let size = file.metadata()?.len();
    let (mut found, mut at) = (Vec::new(), 0u64);
    let mut header = [0u8; HEADER as usize];
    while at + HEADER <= size {
        file.read_exact_at(&mut header, at)?;
        let word = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
        let (start, end, len) = (word(4), word(12), word(20));
        let crc = u32::from_le_bytes(header[28..32].try_into().expect("4 bytes"));
        let whole = &header[..4] == MAGIC && len <= size - at - HEADER && start <= end;
        if !whole {
            break;
        }
        found.push(Piece {
            range: Range { start, end },
            offset: at + HEADER,
            len,
            crc,
        });
        at += HEADER + len;
    }
    Ok((found, at, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64) -> Range {
        Range { start, end }
    }

    /// The bytes of one checkpoint.
    fn one(path: &Path, range: Range) -> std::io::Result<Vec<u8>> {
        let mut read = read(path, &[range], 0)?;
        assert_eq!(read.len(), 1);
        Ok(read.remove(0).1)
    }

    #[test]
    fn several_pieces_are_read_together_within_the_budget() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("digest.log");
        for (i, fill) in [1u8, 2, 3].into_iter().enumerate() {
            let start = i as u64 * 10;
            append(&path, range(start, start + 10), &[fill; 100]).unwrap();
        }
        let all = [range(0, 10), range(10, 20), range(20, 30)];
        let fills = |read: Vec<(Range, Vec<u8>)>| -> Vec<(Range, u8, usize)> {
            read.into_iter().map(|(r, b)| (r, b[0], b.len())).collect()
        };
        assert_eq!(
            fills(read(&path, &all, 300).unwrap()),
            vec![(all[0], 1, 100), (all[1], 2, 100), (all[2], 3, 100)]
        );
        assert_eq!(
            fills(read(&path, &all, 299).unwrap()),
            vec![(all[0], 1, 100), (all[1], 2, 100)],
            "the third would pass the budget"
        );
        assert_eq!(
            fills(read(&path, &all[1..], 0).unwrap()),
            vec![(all[1], 2, 100)],
            "the first is read whatever the budget"
        );
        let gap = [range(0, 10), range(15, 20)];
        assert_eq!(
            read(&path, &gap, 1000).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert!(read(&path, &[], 1000).unwrap().is_empty());
    }

    #[test]
    fn pieces_are_appended_listed_read_and_removed() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("checkpoints").join("digest.log");
        assert!(ranges(&path).unwrap().is_empty());
        assert_eq!(
            one(&path, range(0, 10)).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        append(&path, range(0, 10), b"ten rows").unwrap();
        append(&path, range(10, 20), &[1; 1000]).unwrap();
        append(&path, range(0, 10), b"TEN ROWS").unwrap();
        assert_eq!(
            ranges(&path).unwrap(),
            vec![range(0, 10), range(10, 20), range(0, 10)]
        );
        assert_eq!(
            one(&path, range(0, 10)).unwrap(),
            b"TEN ROWS",
            "the last one wins"
        );
        assert_eq!(one(&path, range(10, 20)).unwrap(), vec![1; 1000]);
        assert_eq!(
            one(&path, range(5, 10)).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(ranges(&path).unwrap().is_empty());
        let legacy = root.path().join("checkpoints").join("digest");
        std::fs::create_dir_all(&legacy).unwrap();
        std::fs::write(legacy.join("0-10.arrow"), b"old").unwrap();
        remove_directory(&legacy).unwrap();
        remove_directory(&legacy).unwrap();
        assert!(!legacy.exists());
    }

    #[test]
    fn a_piece_cut_short_is_ignored_then_cut_off() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("digest.log");
        append(&path, range(0, 10), b"ten rows").unwrap();
        let whole = std::fs::metadata(&path).unwrap().len();
        // A writer killed mid-append: a header and part of its bytes.
        append(&path, range(10, 20), &[7; 100]).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(whole + HEADER + 40).unwrap();
        assert_eq!(ranges(&path).unwrap(), vec![range(0, 10)]);
        append(&path, range(20, 30), b"twenty").unwrap();
        assert_eq!(ranges(&path).unwrap(), vec![range(0, 10), range(20, 30)]);
        assert_eq!(one(&path, range(20, 30)).unwrap(), b"twenty");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            whole + HEADER + 6,
            "the short piece was cut off"
        );
    }

    #[test]
    fn bytes_that_changed_fail_their_checksum() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("digest.log");
        append(&path, range(0, 10), b"ten rows").unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", HEADER).unwrap();
        assert_eq!(
            one(&path, range(0, 10)).unwrap_err().kind(),
            ErrorKind::InvalidData
        );
    }
}
