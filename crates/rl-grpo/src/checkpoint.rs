//! Checkpoint folders: what a resumed run needs to continue exactly where a run stopped.
//!
//! Layout of `OUT/checkpoint-N/` (N = training steps done):
//!
//! - `policy/`: whatever [`Policy::save`](crate::Policy::save) writes;
//! - `optimizer.safetensors`: the AdamW moments keyed by parameter name
//!   ([`optimsyn_optim::OptimizerState`]);
//! - `trainer_state.json`: format tag, step, optimizer steps, the prompt cursor (data epoch and
//!   position; the prompt order of an epoch is a function of the seed and the epoch), the run
//!   seed, a fingerprint of the prompt set, and the full config.
//!
//! A checkpoint is written into a temporary sibling folder and renamed into place, then
//! `OUT/latest` (the folder's name) is replaced atomically, so a crash leaves either the previous
//! or the new checkpoint, never a partial one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::prompt_key;
use crate::rollout::Prompt;

/// The `format` of `trainer_state.json`.
pub const STATE_FORMAT: &str = "optimsyn.grpo.trainer.v1";
/// File name of the trainer state inside a checkpoint folder.
pub const STATE_FILE: &str = "trainer_state.json";
/// Folder of the policy's own files inside a checkpoint folder.
pub const POLICY_DIR: &str = "policy";
/// The pointer file naming the latest checkpoint folder of an output folder.
pub const LATEST_FILE: &str = "latest";
/// The metrics file of an output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Where the trainer is in the prompt set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataCursor {
    /// Passes over the prompt set begun (0-based).
    pub epoch: u64,
    /// Prompts of the current epoch's order already used.
    pub position: usize,
}

/// The contents of `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// [`STATE_FORMAT`].
    pub format: String,
    /// Training steps done.
    pub step: u64,
    /// Optimizer steps done.
    pub optimizer_steps: u64,
    /// The prompt cursor.
    pub data: DataCursor,
    /// The run seed.
    pub seed: u64,
    /// Number of prompts in the prompt set.
    pub prompts: usize,
    /// Fingerprint of the prompt set (ids and tokens, in order).
    pub prompts_fingerprint: String,
    /// The run's config, as JSON.
    pub config: serde_json::Value,
    /// This crate's version.
    pub crate_version: String,
}

/// A fingerprint of a prompt set (FNV-1a over ids and tokens, hex).
pub fn prompts_fingerprint(prompts: &[Prompt]) -> String {
    let mut h = optimsyn_fsio::hash::Fnv1a::new();
    for p in prompts {
        h.update(&prompt_key(&p.id).to_le_bytes());
        for t in &p.tokens {
            h.update(&t.to_le_bytes());
        }
        h.update(&[0xff]);
    }
    format!("{:016x}", h.finish())
}

/// Reads and checks `dir/trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let bytes = optimsyn_data_io::jsonl::read_file(&path)?;
    let state: TrainerState = serde_json::from_slice(&bytes)
        .map_err(|e| Error::checkpoint(&path, format!("not a trainer state: {e}")))?;
    if state.format != STATE_FORMAT {
        return Err(Error::checkpoint(
            &path,
            format!(
                "format `{}` is not `{STATE_FORMAT}` (written by another version?)",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// The first key path where two JSON values differ (`loss.clip_low`), if any.
pub(crate) fn first_difference(a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, va) in x {
                match y.get(k) {
                    None => return Some(k.clone()),
                    Some(vb) => {
                        if let Some(d) = first_difference(va, vb) {
                            return Some(if d.is_empty() {
                                k.clone()
                            } else {
                                format!("{k}.{d}")
                            });
                        }
                    }
                }
            }
            y.keys().find(|k| !x.contains_key(*k)).cloned()
        }
        _ if a == b => None,
        _ => Some(String::new()),
    }
}

/// The checkpoint folder the `latest` pointer of `out` names, if any.
pub fn latest_checkpoint(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = out.join(LATEST_FILE);
    if !pointer.exists() {
        return Ok(None);
    }
    let bytes = optimsyn_data_io::jsonl::read_file(&pointer)?;
    let name = String::from_utf8_lossy(&bytes).trim().to_owned();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::checkpoint(
            &pointer,
            format!("`{name}` is not a checkpoint folder name"),
        ));
    }
    let dir = out.join(&name);
    if !dir.join(STATE_FILE).is_file() {
        return Err(Error::checkpoint(
            &dir,
            format!("named by {} but has no {STATE_FILE}", pointer.display()),
        ));
    }
    Ok(Some(dir))
}

/// The name of the checkpoint folder after `step` steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Moves the finished temporary folder `tmp` to `dir` (synced; an older `dir` is moved aside and
/// removed only once the new one is in place: [`optimsyn_fsio::publish_dir`]).
pub(crate) fn publish(tmp: &Path, dir: &Path) -> Result<()> {
    optimsyn_fsio::publish_dir(tmp, dir).map_err(|e| match e {
        optimsyn_fsio::Error::Io {
            path,
            action,
            source,
        } => Error::io(path, action, source),
        other => Error::io(
            dir,
            "cannot publish the checkpoint",
            std::io::Error::other(other),
        ),
    })
}

/// Removes all but the newest `keep` `checkpoint-N` folders of `out` (never `current`).
pub(crate) fn prune(out: &Path, keep: usize, current: &Path) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, "cannot list", e))?;
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(out, "cannot list", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse().ok())
        {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    let excess = found.len().saturating_sub(keep);
    for (_, path) in found.into_iter().take(excess) {
        if path != current {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, "cannot remove", e))?;
        }
    }
    Ok(())
}

/// Rewrites the metrics file keeping only rows of steps `≤ step`, so that a resumed run's rows
/// continue without duplicates (rows written after the checkpoint it resumes from are dropped).
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    Ok(optimsyn_data_io::truncate_rows_after(path, "step", step)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn first_difference_names_the_path() {
        let a = json!({"a": 1, "loss": {"clip_low": 0.2, "x": [1, 2]}});
        let b = json!({"a": 1, "loss": {"clip_low": 0.3, "x": [1, 2]}});
        assert_eq!(first_difference(&a, &b).as_deref(), Some("loss.clip_low"));
        assert_eq!(first_difference(&a, &a), None);
        let c = json!({"a": 1});
        assert_eq!(first_difference(&a, &c).as_deref(), Some("loss"));
    }

    #[test]
    fn fingerprint_sees_ids_tokens_and_order() {
        let p = |id: &str, t: Vec<u32>| Prompt::new(id, t);
        let a = prompts_fingerprint(&[p("x", vec![1, 2]), p("y", vec![3])]);
        assert_eq!(
            a,
            prompts_fingerprint(&[p("x", vec![1, 2]), p("y", vec![3])])
        );
        assert_ne!(
            a,
            prompts_fingerprint(&[p("y", vec![3]), p("x", vec![1, 2])])
        );
        assert_ne!(
            a,
            prompts_fingerprint(&[p("x", vec![1]), p("y", vec![2, 3])])
        );
        assert_ne!(
            a,
            prompts_fingerprint(&[p("z", vec![1, 2]), p("y", vec![3])])
        );
    }

    #[test]
    fn truncating_metrics_keeps_earlier_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"st").unwrap();
        truncate_metrics(&path, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
    }
}
