//! Data hygiene for synthetic datasets.
//!
//! A loop that rewards QA pairs for lowering a target's validation loss is built to drift toward
//! the validation set: a generator that restates validation questions would score high and poison
//! every later evaluation on that set. This crate looks:
//!
//! - **Decontamination** ([`Reference`]): word n-gram overlap (13 by default) of normalised text
//!   against evaluation rows; short questions count when repeated whole. Each hit names the
//!   reference file, line and id and the longest common run of words.
//! - **Deduplication** ([`Deduper`]): exact duplicates of the normalised text and near duplicates by
//!   MinHash over word pairs with banded LSH; the first of a cluster is kept.
//! - **Screening samples** ([`Screen`]): both, recorded in the samples' provenance; and a
//!   [`DatasetCard`] that says what a dataset holds and what was taken out.
//!
//! Files stream ([`decontaminate_file`], [`dedup_file`]): memory holds the reference index and the
//! kept rows' signatures, not the input.
//!
//! ```
//! use optimsyn_hygiene::{DecontamConfig, RefRow, Reference};
//! let mut val = Reference::new(DecontamConfig::default());
//! val.add_row(RefRow { source: "val.jsonl".into(), row: 3, id: None },
//!     &serde_json::json!({"question": "In which year was Tesaxan first found?"}))?;
//! let answer = "Good question. In which year was Tesaxan first found? In 1885.";
//! let hit = val.check_row(&serde_json::json!({"answer": answer}))?.unwrap();
//! assert_eq!((hit.source.as_str(), hit.row, hit.words), ("val.jsonl", 3, 7));
//! # Ok::<(), String>(())
//! ```

mod card;
mod decontam;
mod dedup;
mod error;
mod screen;
mod stream;
mod text;

pub use card::{DatasetCard, Distribution, Flagged, ReferenceFile, ScreenSettings};
pub use decontam::{DecontamConfig, RefRow, Reference};
pub use dedup::{DedupConfig, Deduper, Duplicate};
pub use error::{Error, Result};
pub use optimsyn_data_io::Overlap;
pub use screen::{CONTAMINATED, DUPLICATE, OnContaminated, Screen, ScreenCounts, dedup_examples};
pub use stream::{FileCounts, decontaminate_file, dedup_file, reference_from_files};
pub use text::{Part, Segment, example_segments, normalized_text, row_id, row_segments, words};
