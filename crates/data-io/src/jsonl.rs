//! JSON Lines: a streaming reader that names file, line and field on bad rows, and a crash-safe
//! appending writer.
//!
//! The writer never leaves a half-written last line behind for the next run: every row goes out in
//! one `write` of the complete line, and [`JsonlWriter::append`] cuts off a partial tail left by a
//! crash before it appends, so a resumed run continues from the last complete row.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// How many row errors a skipping reader keeps for reporting.
const KEPT_ERRORS: usize = 10;

/// Counts of what a reader has seen so far.
#[derive(Debug, Default)]
pub struct ReadStats {
    /// Rows returned.
    pub rows: u64,
    /// Rows skipped as invalid (only when skipping is on).
    pub skipped: u64,
    /// The first few skipped rows' errors, each naming file, line and field.
    pub errors: Vec<Error>,
}

type Parser<T> = Box<dyn Fn(&[u8]) -> std::result::Result<T, String> + Send>;

/// Streams rows of type `T` from a JSONL file. Blank lines are ignored.
///
/// ```
/// # fn main() -> optimsyn_data_io::Result<()> {
/// use optimsyn_data_io::{ChatExample, JsonlReader, JsonlWriter};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("chats.jsonl");
/// let mut w = JsonlWriter::create(&path)?;
/// w.write(&ChatExample::qa("What is 2+2?", "4"))?;
/// std::fs::OpenOptions::new().append(true).open(&path).unwrap()
///     .write_all(b"{\"messages\": 3}\n").unwrap();
/// # use std::io::Write;
/// let mut reader = JsonlReader::<ChatExample>::open(&path)?.skip_invalid(true);
/// let rows: Vec<_> = reader.by_ref().collect::<Result<_, _>>()?;
/// assert_eq!(rows.len(), 1);
/// assert_eq!(reader.stats().skipped, 1);
/// assert!(reader.stats().errors[0].to_string().contains("chats.jsonl:2: field `messages`"));
/// # Ok(()) }
/// ```
pub struct JsonlReader<T> {
    path: PathBuf,
    reader: BufReader<File>,
    line: u64,
    buf: Vec<u8>,
    skip_invalid: bool,
    stats: ReadStats,
    parse: Parser<T>,
    done: bool,
    _row: PhantomData<fn() -> T>,
}

/// Parses one row with serde, naming the field path on failure.
pub fn parse_row<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(format!("invalid JSON: {inner}"))
            } else {
                match e.path().to_string().as_str() {
                    "." => Err(inner.to_string()),
                    p => Err(format!("field `{p}`: {inner}")),
                }
            }
        }
    }
}

impl<T: DeserializeOwned + 'static> JsonlReader<T> {
    /// Opens `path` for streaming rows deserialized with serde.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::with_parser(path, parse_row::<T>)
    }
}

impl<T> JsonlReader<T> {
    /// Opens `path` with a custom row parser (bytes of one line → row, or a message naming the field).
    pub fn with_parser(
        path: impl AsRef<Path>,
        parse: impl Fn(&[u8]) -> std::result::Result<T, String> + Send + 'static,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(JsonlReader {
            path,
            reader: BufReader::new(file),
            line: 0,
            buf: Vec::new(),
            skip_invalid: false,
            stats: ReadStats::default(),
            parse: Box::new(parse),
            done: false,
            _row: PhantomData,
        })
    }

    /// When on, malformed rows are skipped and counted in [`stats`](Self::stats) instead of ending the
    /// stream with an error. I/O errors always end it.
    pub fn skip_invalid(mut self, on: bool) -> Self {
        self.skip_invalid = on;
        self
    }

    /// What has been read and skipped so far.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The 1-based line number of the row returned last (blank lines count, as editors count them).
    pub fn line(&self) -> u64 {
        self.line
    }

    fn row_error(&self, message: String) -> Error {
        Error::Row {
            path: self.path.clone(),
            line: self.line,
            message,
        }
    }
}

impl<T> Iterator for JsonlReader<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        while !self.done {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => {
                    self.done = true;
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(Error::io(&self.path, e)));
                }
            }
            self.line += 1;
            let complete = self.buf.last() == Some(&b'\n');
            let text = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed = match std::str::from_utf8(text) {
                Err(e) => Err(format!("not valid UTF-8 (byte {})", e.valid_up_to())),
                Ok(_) => (self.parse)(text),
            };
            match parsed {
                Ok(row) => {
                    self.stats.rows += 1;
                    return Some(Ok(row));
                }
                Err(msg) => {
                    let msg = if complete {
                        msg
                    } else {
                        format!(
                            "truncated last line (no newline at end of file; cut off mid-write?): {msg}"
                        )
                    };
                    let err = self.row_error(msg);
                    if !self.skip_invalid {
                        self.done = true;
                        return Some(Err(err));
                    }
                    self.stats.skipped += 1;
                    if self.stats.errors.len() < KEPT_ERRORS {
                        self.stats.errors.push(err);
                    }
                }
            }
        }
        None
    }
}

/// Keeps only the rows of a JSONL file whose integer `field` is at most `keep` (a resumed run
/// drops what a stopped one logged after its last checkpoint), rewriting it atomically. Rows
/// that do not parse (a partial last line) or lack the field are dropped; a missing file is fine.
pub fn truncate_rows_after(path: impl AsRef<Path>, field: &str, keep: u64) -> Result<()> {
    let path = path.as_ref();
    if !path.exists() {
        return Ok(());
    }
    let bytes = read_file(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut kept = String::new();
    for line in text.lines() {
        let v = serde_json::from_str::<serde_json::Value>(line).ok();
        if v.as_ref()
            .and_then(|v| v.get(field))
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|s| s <= keep)
        {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_atomic(path, kept.as_bytes())
}

/// Reads every row of a JSONL file, failing on the first bad one.
pub fn read_jsonl<T: DeserializeOwned + 'static>(path: impl AsRef<Path>) -> Result<Vec<T>> {
    JsonlReader::open(path)?.collect()
}

/// Appends rows to a JSONL file so that a crash never leaves a partial row for the next reader.
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
    existing: u64,
    written: u64,
    repaired: u64,
    line: Vec<u8>,
}

impl JsonlWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(JsonlWriter {
            path,
            file,
            existing: 0,
            written: 0,
            repaired: 0,
            line: Vec::new(),
        })
    }

    /// Opens `path` for appending, creating it if needed. A partial last line (a crash mid-write) is
    /// cut off first; [`existing_rows`](Self::existing_rows) tells how many complete rows were kept,
    /// so a resumed run knows where to continue.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let (complete_len, lines) =
            scan_complete_lines(&mut file).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if complete_len < len {
            file.set_len(complete_len)
                .map_err(|e| Error::io(&path, e))?;
            file.sync_data().map_err(|e| Error::io(&path, e))?;
        }
        Ok(JsonlWriter {
            path,
            file,
            existing: lines,
            written: 0,
            repaired: len - complete_len,
            line: Vec::new(),
        })
    }

    /// Complete non-blank rows that were already in the file when it was opened.
    pub fn existing_rows(&self) -> u64 {
        self.existing
    }

    /// Bytes of a partial last line removed when the file was opened (0 after a clean stop).
    pub fn repaired_bytes(&self) -> u64 {
        self.repaired
    }

    /// Rows written through this writer.
    pub fn written_rows(&self) -> u64 {
        self.written
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serializes `row` as one line and writes it with a single write.
    pub fn write<T: Serialize + ?Sized>(&mut self, row: &T) -> Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, row).map_err(|e| {
            Error::invalid(
                &self.path,
                format!("row {} cannot be serialized: {e}", self.written + 1),
            )
        })?;
        self.line.push(b'\n');
        self.file
            .write_all(&self.line)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += 1;
        Ok(())
    }

    /// Makes every row written so far durable (fsync).
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

/// Length of the prefix made of complete lines, and how many of them are non-blank.
fn scan_complete_lines(file: &mut File) -> std::io::Result<(u64, u64)> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&mut *file);
    let (mut complete, mut lines) = (0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            break;
        }
        complete += n as u64;
        if !buf.iter().all(u8::is_ascii_whitespace) {
            lines += 1;
        }
    }
    Ok((complete, lines))
}

/// Writes a whole file atomically and durably (see [`optimsyn_fsio::write_atomic`], its one home):
/// a reader, or a restart after a crash, sees the old file or the complete new one.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    optimsyn_fsio::write_atomic(path, bytes).map_err(Error::from)
}

/// Reads a whole file into memory, naming it on failure.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    let mut out = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut out))
        .map_err(|e| Error::io(path, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::ChatExample;
    use std::fs;

    #[test]
    fn append_repairs_a_partial_tail_and_counts_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        let mut w = JsonlWriter::create(&p).unwrap();
        w.write(&ChatExample::qa("a", "b")).unwrap();
        w.write(&ChatExample::qa("c", "d")).unwrap();
        drop(w);
        // a crash mid-row
        OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"{\"messages\": [{\"ro")
            .unwrap();
        let mut w = JsonlWriter::append(&p).unwrap();
        assert_eq!(w.existing_rows(), 2);
        assert_eq!(w.repaired_bytes(), 18);
        w.write(&ChatExample::qa("e", "f")).unwrap();
        drop(w);
        let rows: Vec<ChatExample> = read_jsonl(&p).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].messages[1].content, "f");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.jsonl");
        fs::write(
            &p,
            "{\"messages\": []}\n\n{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n",
        )
        .unwrap();
        let e = read_jsonl::<ChatExample>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:3: field `messages[0].role`"), "{e}");
        assert!(e.contains("tool"), "{e}");
        fs::write(
            &p,
            "{\"messages\": []}\n{\"messages\": [{\"role\": \"user\", \"conte",
        )
        .unwrap();
        let e = read_jsonl::<ChatExample>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2: truncated last line"), "{e}");
        fs::write(
            &p,
            "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}\n",
        )
        .unwrap();
        let e = read_jsonl::<ChatExample>(&p).unwrap_err().to_string();
        assert!(
            e.contains(":1: field `messages[0].content`: invalid type: integer `5`"),
            "{e}"
        );
        let e = read_jsonl::<ChatExample>(dir.path().join("missing.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn write_atomic_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
