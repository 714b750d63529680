//! Whole JSONL files through decontamination or deduplication, one row at a time: memory holds the
//! reference index (and, for deduplication, the kept rows' signatures), never the input.

use std::path::Path;

use optimsyn_data_io::{JsonlReader, Overlap};
use serde_json::Value;

use crate::decontam::Reference;
use crate::dedup::{DedupConfig, Deduper, Duplicate};
use crate::error::{Error, Result};
use crate::text::{normalized_text, row_id, row_segments};

/// Counts of one pass over a file.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FileCounts {
    /// Rows read.
    pub rows: u64,
    /// Rows flagged (contaminated, or duplicates).
    pub flagged: u64,
}

/// Streams `input` through `reference`; `sink` gets every row with its overlap, if any.
/// A row without text is an error naming file and line.
pub fn decontaminate_file(
    reference: &Reference,
    input: &Path,
    mut sink: impl FnMut(Value, Option<Overlap>) -> Result<()>,
) -> Result<FileCounts> {
    let mut counts = FileCounts::default();
    let mut reader = JsonlReader::<Value>::open(input)?;
    while let Some(row) = reader.next() {
        let row = row?;
        let segments = row_segments(&row).map_err(|message| Error::Row {
            path: input.to_path_buf(),
            line: reader.line(),
            message,
        })?;
        let hit = reference.check(&segments);
        counts.rows += 1;
        counts.flagged += u64::from(hit.is_some());
        sink(row, hit)?;
    }
    Ok(counts)
}

/// Streams `input` through exact and near-duplicate detection; `sink` gets every row with what it
/// duplicates, if anything. Rows are named by their `id`, or `line N` without one.
pub fn dedup_file(
    cfg: DedupConfig,
    input: &Path,
    mut sink: impl FnMut(Value, Option<Duplicate>) -> Result<()>,
) -> Result<FileCounts> {
    let mut dedup = Deduper::new(cfg)?;
    let mut counts = FileCounts::default();
    let mut reader = JsonlReader::<Value>::open(input)?;
    while let Some(row) = reader.next() {
        let row = row?;
        let segments = row_segments(&row).map_err(|message| Error::Row {
            path: input.to_path_buf(),
            line: reader.line(),
            message,
        })?;
        let key = row_id(&row).unwrap_or_else(|| format!("line {}", reader.line()));
        let dup = dedup.push(&key, &normalized_text(&segments));
        counts.rows += 1;
        counts.flagged += u64::from(dup.is_some());
        sink(row, dup)?;
    }
    Ok(counts)
}

/// A reference index over `files`; an error if any is missing or unreadable, or if together they
/// hold no rows.
pub fn reference_from_files(
    cfg: crate::DecontamConfig,
    files: &[impl AsRef<Path>],
) -> Result<(Reference, Vec<crate::ReferenceFile>)> {
    if cfg.ngram == 0 {
        return Err(Error::Config(
            "decontamination ngram must be at least 1".into(),
        ));
    }
    let mut reference = Reference::new(cfg);
    let mut stats = Vec::new();
    for f in files {
        let rows = reference.add_file(f.as_ref())?;
        stats.push(crate::ReferenceFile {
            path: f.as_ref().display().to_string(),
            rows,
        });
    }
    if reference.is_empty() {
        let names: Vec<String> = files
            .iter()
            .map(|f| f.as_ref().display().to_string())
            .collect();
        return Err(Error::EmptyReference {
            files: if names.is_empty() {
                "no files".into()
            } else {
                names.join(", ")
            },
        });
    }
    Ok((reference, stats))
}
