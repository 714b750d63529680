//! The scorer: per-sample gradients at each warm-up checkpoint, Adam preconditioning, projection,
//! and cosine against the validation features.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer};
use optimsyn_lm::sft::{TRAINING_FILE, TrainingRecord};
use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, TrainExample};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::{ScoreConfig, SubtaskAgg};
use crate::diagnostics::{Discrimination, FeatureStats};
use crate::error::{Error, Result, TorchContext};
use crate::features::val_features;
use crate::grads::{encode_examples, grad_rows, gradients_into, loss_tokens};
use crate::precond::AdamMoments;
use crate::project::Projector;
use crate::score::Score;

/// One warm-up checkpoint, ready to score against.
#[derive(Debug)]
struct Checkpoint {
    dir: PathBuf,
    weight: f64,
    moments: AdamMoments,
    /// `[M, k]` L2-normalized projected validation gradients.
    val: Tensor,
}

/// Scores candidates by their Adam-preconditioned, projected LoRA-gradient cosine against a
/// validation set's gradients, summed over warm-up checkpoints weighted by their average
/// learning rates (LESS's `Inf_Adam`; see the crate docs).
#[derive(Debug)]
pub struct InfluenceScorer {
    model: CausalLm,
    adapter: LoraAdapter,
    tokenizer: ChatTokenizer,
    format: ChatFormat,
    projector: Projector,
    checkpoints: Vec<Checkpoint>,
    /// Subtask names, sorted; `val_subtask[j]` indexes into it.
    subtask_names: Vec<String>,
    val_subtask: Vec<usize>,
    cfg: ScoreConfig,
    /// The per-sample gradient buffer, reused by later calls of at most as many rows: a fresh
    /// `[n, P]` tensor is a new mapping each call (940 MB for 64 rows on the bench model), and
    /// faulting its pages in costs a few percent of a call.
    grad_buf: Option<Tensor>,
}

/// The flattened parameter order and shapes of an adapter.
fn param_layout(adapter: &LoraAdapter) -> Vec<(String, Vec<i64>)> {
    adapter
        .named_parameters()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect()
}

/// The data format every checkpoint was trained on (or `requested`, which must agree), and each
/// checkpoint's weight: its average learning rate, normalized, when every checkpoint records one
/// (LESS's η̄ᵢ); equal weights otherwise.
fn checkpoint_records(
    adapters: &[PathBuf],
    requested: Option<ChatFormat>,
) -> Result<(ChatFormat, Vec<f64>)> {
    let records: Vec<Option<TrainingRecord>> = adapters
        .iter()
        .map(|d| {
            if d.join(TRAINING_FILE).exists() {
                TrainingRecord::load(d).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<std::result::Result<_, _>>()?;
    let mut format = requested;
    for (d, r) in adapters.iter().zip(&records) {
        if let Some(f) = r.as_ref().and_then(|r| r.format) {
            match format {
                None => format = Some(f),
                Some(g) if g != f => {
                    return Err(Error::Checkpoint {
                        path: d.join(TRAINING_FILE),
                        message: format!(
                            "the adapter was trained on the {f:?} format, but scoring asks for {g:?}: gradients would not match the warm-up"
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    let format = format.ok_or_else(|| {
        Error::Input(
            "the adapters have no training.json recording their data format: pass the format"
                .into(),
        )
    })?;
    let weights: Vec<f64> = if records
        .iter()
        .all(|r| r.as_ref().is_some_and(|r| r.avg_lr > 0.0))
    {
        let w: Vec<f64> = records
            .iter()
            .map(|r| r.as_ref().map_or(0.0, |r| r.avg_lr))
            .collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    } else {
        vec![1.0 / adapters.len() as f64; adapters.len()]
    };
    Ok((format, weights))
}

/// The validation set's subtask names (sorted) and each example's index among them; every
/// example must have a loss token.
fn subtasks_of(val: &[TrainExample]) -> Result<(Vec<String>, Vec<usize>)> {
    if let Some(e) = val.iter().find(|e| loss_tokens(e) == 0) {
        return Err(Error::Input(format!(
            "validation example {} has no loss token (no assistant turn?)",
            e.id
        )));
    }
    let mut names: Vec<String> = val
        .iter()
        .map(|e| e.subtask.clone().unwrap_or_default())
        .collect();
    names.sort();
    names.dedup();
    let index = val
        .iter()
        .map(|e| {
            names
                .binary_search(&e.subtask.clone().unwrap_or_default())
                .unwrap_or(0)
        })
        .collect();
    Ok((names, index))
}

/// L2-normalizes rows (zero rows stay zero).
fn normalize(x: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let n = x
            .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
            .f_clamp_min(1e-30)?;
        x.f_div(&n)
    };
    f().op("normalizing")
}

impl InfluenceScorer {
    /// Loads the target model, the warm-up checkpoints (`adapters`, each a PEFT adapter folder
    /// with `optimizer.safetensors` and usually `training.json`), and computes (or reuses from
    /// disk) the validation features.
    pub fn new(
        target: &Path,
        adapters: &[PathBuf],
        val: &[ChatExample],
        cfg: ScoreConfig,
        opts: LoadOptions,
    ) -> Result<Self> {
        if adapters.is_empty() {
            return Err(Error::Input(
                "influence needs at least one warm-up checkpoint (--adapter)".into(),
            ));
        }
        if val.is_empty() {
            return Err(Error::Input("the validation set is empty".into()));
        }
        let tokenizer = ChatTokenizer::from_model_dir(target)?;
        let mut model = CausalLm::load(target, opts)?;
        let adapter = LoraAdapter::load(&mut model, &adapters[0])?;
        let (format, weights) = checkpoint_records(adapters, cfg.format)?;
        let layout = param_layout(&adapter);
        let p: usize = layout
            .iter()
            .map(|(_, s)| s.iter().product::<i64>() as usize)
            .sum();
        let projector = Projector::new(cfg.projector, p, cfg.cache_bytes)?;

        let val_enc = encode_examples(&tokenizer, val, format, cfg.max_len)?;
        let (names, val_subtask) = subtasks_of(&val_enc)?;
        let mut checkpoints = Vec::with_capacity(adapters.len());
        for (dir, weight) in adapters.iter().zip(weights) {
            adapter.load_weights(dir)?;
            let moments = AdamMoments::load(
                &dir.join(optimsyn_optim::state::FILE_NAME),
                &layout,
                model.device(),
            )?;
            if moments.len() != p {
                return Err(Error::Checkpoint {
                    path: dir.clone(),
                    message: "moments do not cover the adapter".into(),
                });
            }
            let val = val_features(&model, &adapter, &projector, &val_enc, dir, &cfg)?;
            checkpoints.push(Checkpoint {
                dir: dir.clone(),
                weight,
                moments,
                val,
            });
        }
        Ok(InfluenceScorer {
            model,
            adapter,
            tokenizer,
            format,
            projector,
            checkpoints,
            subtask_names: names,
            val_subtask,
            cfg,
            grad_buf: None,
        })
    }

    /// The data format candidates are rendered in.
    pub fn format(&self) -> ChatFormat {
        self.format
    }

    /// Validation subtask names (sorted; `""` for examples without one).
    pub fn subtasks(&self) -> &[String] {
        &self.subtask_names
    }

    /// The target model (with the last checkpoint's adapter attached).
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// The scoring settings.
    pub fn config(&self) -> &ScoreConfig {
        &self.cfg
    }

    /// The target's tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// The attached adapter (holding the weights of the checkpoint last selected).
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// Frees the per-sample gradient buffer that scoring calls keep for the next call (`[n, P]`
    /// for the largest call so far).
    pub fn release_buffer(&mut self) {
        self.grad_buf = None;
    }

    /// Loads checkpoint `i`'s weights into the attached adapter.
    pub fn select_checkpoint(&mut self, i: usize) -> Result<()> {
        let dir = &self
            .checkpoints
            .get(i)
            .ok_or_else(|| Error::Input(format!("no checkpoint {i}")))?
            .dir;
        Ok(self.adapter.load_weights(dir)?)
    }

    /// Γ of gradients `[B, P]` under checkpoint `i`'s moments.
    pub fn gamma(&self, i: usize, g: &Tensor) -> Result<Tensor> {
        let c = self
            .checkpoints
            .get(i)
            .ok_or_else(|| Error::Input(format!("no checkpoint {i}")))?;
        c.moments.precondition(g, self.cfg.precond)
    }

    /// Scores chat examples (rendered in the adapters' format).
    pub fn score(&mut self, examples: &[ChatExample]) -> Result<Vec<Score>> {
        Ok(self.score_report(examples)?.scores)
    }

    /// Scores already encoded examples. Candidates without loss tokens get `influence: None` and
    /// a reason, never NaN.
    pub fn score_encoded(&mut self, examples: &[TrainExample]) -> Result<Vec<Score>> {
        Ok(self.score_report_encoded(examples)?.scores)
    }

    /// Scores chat examples and says how well the scores tell them apart ([`Discrimination`]).
    pub fn score_report(&mut self, examples: &[ChatExample]) -> Result<ScoreReport> {
        let enc = encode_examples(&self.tokenizer, examples, self.format, self.cfg.max_len)?;
        self.score_report_encoded(&enc)
    }

    /// [`InfluenceScorer::score_report`] of already encoded examples.
    pub fn score_report_encoded(&mut self, examples: &[TrainExample]) -> Result<ScoreReport> {
        let n = examples.len();
        let scorable: Vec<usize> = (0..n)
            .filter(|&i| loss_tokens(&examples[i]) > 0 && examples[i].tokens.len() >= 2)
            .collect();
        let ctx = self.model.config().max_position_embeddings;
        if let Some(&i) = scorable.iter().find(|&&i| examples[i].tokens.len() > ctx) {
            return Err(Error::Input(format!(
                "candidate {}: {} tokens is longer than the model's context ({ctx}); set max_len",
                examples[i].id,
                examples[i].tokens.len()
            )));
        }
        let m = self.val_subtask.len();
        let mut total = Tensor::f_zeros(
            [scorable.len() as i64, m as i64],
            (Kind::Float, self.model.device()),
        )
        .op("scores")?;
        let mut first_losses = Vec::new();
        let mut features = FeatureAccumulator::default();
        if !scorable.is_empty() {
            let multi = self.checkpoints.len() > 1;
            for c in &self.checkpoints {
                // One checkpoint stays attached from construction; several take turns.
                if multi {
                    self.adapter.load_weights(&c.dir)?;
                }
                let mut gamma = grad_rows(
                    &mut self.grad_buf,
                    &self.adapter,
                    scorable.len(),
                    self.model.device(),
                )?;
                let losses = gradients_into(
                    &self.model,
                    &self.adapter,
                    examples,
                    &scorable,
                    self.cfg.max_batch_tokens,
                    &gamma,
                )?;
                if first_losses.is_empty() {
                    first_losses = losses;
                }
                if gamma.kind() != Kind::Float {
                    gamma = gamma.f_to_kind(Kind::Float).op("gradients")?;
                }
                c.moments.precondition_(&mut gamma, self.cfg.precond)?;
                let x = normalize(&self.projector.project(&gamma)?)?;
                features.add(&x, c.weight)?;
                let cos = x.f_matmul(&c.val.f_tr().op("scores")?).op("scores")?;
                total = total
                    .f_add(&cos.f_mul_scalar(c.weight).op("scores")?)
                    .op("scores")?;
            }
        }
        let mat = Vec::<f32>::try_from(
            &total
                .f_to_device(tch::Device::Cpu)
                .op("scores")?
                .f_reshape([-1])
                .op("scores")?,
        )
        .map_err(|e| Error::Torch {
            op: "reading scores".into(),
            source: e,
        })?;
        let s = self.subtask_names.len();
        let mut counts = vec![0usize; s];
        for &j in &self.val_subtask {
            counts[j] += 1;
        }
        let mut out: Vec<Score> = examples
            .iter()
            .map(|e| Score {
                id: e.id.clone(),
                influence: None,
                subtasks: BTreeMap::new(),
                tokens: e.tokens.len(),
                loss_tokens: loss_tokens(e),
                loss: None,
                reason: Some("no loss tokens (no assistant turn, or truncated away)".into()),
            })
            .collect();
        for (row, &i) in scorable.iter().enumerate() {
            let mut sums = vec![0f64; s];
            for (j, &t) in self.val_subtask.iter().enumerate() {
                sums[t] += f64::from(mat[row * m + j]);
            }
            let means: Vec<f64> = sums
                .iter()
                .zip(&counts)
                .map(|(x, c)| x / *c as f64)
                .collect();
            let agg = match self.cfg.subtask_agg {
                SubtaskAgg::Max => means.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                SubtaskAgg::Mean => means.iter().sum::<f64>() / s as f64,
            };
            let o = &mut out[i];
            o.influence = Some(agg);
            o.subtasks = self.subtask_names.iter().cloned().zip(means).collect();
            o.loss = first_losses.get(row).map(|l| f64::from(*l));
            o.reason = None;
        }
        let discrimination = Discrimination::new(&out, features.finish());
        Ok(ScoreReport {
            scores: out,
            discrimination,
        })
    }
}

/// Scores with the check of whether they discriminate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    /// One per candidate, in order.
    pub scores: Vec<Score>,
    /// `None` with fewer than two scored candidates.
    pub discrimination: Option<Discrimination>,
}

/// [`FeatureStats`] summed over checkpoints with their weights.
#[derive(Default)]
struct FeatureAccumulator {
    weight: f64,
    top_share: f64,
    pairwise: f64,
}

impl FeatureAccumulator {
    /// Adds one checkpoint's `[n, k]` unit-norm candidate features.
    fn add(&mut self, x: &Tensor, weight: f64) -> Result<()> {
        let n = x.size()[0];
        if n < 2 {
            return Ok(());
        }
        let f = || -> std::result::Result<(f64, f64), tch::TchError> {
            // The n × n cosine matrix: its trace is n, so λ_max / n is the top direction's share.
            let g = x.f_matmul(&x.f_tr()?)?.f_to_kind(Kind::Double)?;
            let top = g.f_linalg_eigvalsh("L")?.f_max()?.f_double_value(&[])?;
            let off =
                g.f_sum(Kind::Double)?.f_double_value(&[])? - g.f_trace()?.f_double_value(&[])?;
            Ok((top / n as f64, off / (n * (n - 1)) as f64))
        };
        let (top, pairwise) = f().op("feature statistics")?;
        self.weight += weight;
        self.top_share += weight * top;
        self.pairwise += weight * pairwise;
        Ok(())
    }

    fn finish(&self) -> Option<FeatureStats> {
        (self.weight > 0.0).then(|| FeatureStats {
            top_share: self.top_share / self.weight,
            mean_pairwise_cosine: self.pairwise / self.weight,
        })
    }
}
