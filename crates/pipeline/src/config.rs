//! The run configuration: one TOML file, every key documented, unknown keys refused.

use std::path::{Path, PathBuf};

use optimsyn_hygiene::OnContaminated;
use optimsyn_influence::{Precond, ProjectorType, SubtaskAgg};
use optimsyn_rl_grpo::GrpoConfig;
use serde::{Deserialize, Serialize};

use crate::device::{DeviceName, Dtype};
use crate::error::{Error, Result};

/// `Err(Error::Config(..))` unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Error::Config(format!($($msg)+)));
        }
    };
}

/// `Err(Error::Config(..))`.
macro_rules! bail {
    ($($msg:tt)+) => {
        return Err(Error::Config(format!($($msg)+)))
    };
}

/// How influence scores become rewards (the OptimSyn paper, arXiv 2604.00536, §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RewardMode {
    /// Min–max of raw IF over the valid rollouts of the batch, then `Valid·IF_norm − λ(1−Valid)`.
    #[default]
    Normalized,
    /// The paper's `Valid·IF − λ(1−Valid)` on raw IF.
    Paper,
    /// The released code: batch min–max with invalid placeholders (IF 0) included, times Valid.
    CodeExact,
}

/// Seed documents and validation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Seed documents (JSONL `{"id", text field, "domain"?}`).
    pub seeds: PathBuf,
    /// The seed documents' text field. Default `text` (the paper's medical corpus: `clean_text`).
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Domain of documents without one.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Validation chat examples for influence (with `subtask`).
    pub val: PathBuf,
    /// Held-out chat examples for the final evaluation (optional).
    #[serde(default)]
    pub heldout: Option<PathBuf>,
    /// Fraction of the initial pool that warms up the target. Default 0.1.
    #[serde(default = "default_warmup_fraction")]
    pub warmup_fraction: f64,
    /// Fraction of seeds kept for RL (the rest is the 10 % held-out prompt split). Default 0.9.
    #[serde(default = "default_train_fraction")]
    pub train_fraction: f64,
    /// More evaluation files (JSONL) that written data must not overlap, besides `val` and
    /// `heldout` (which are always checked). Default none.
    #[serde(default)]
    pub decontaminate: Vec<PathBuf>,
}

/// Model folders (Hugging Face layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// The rubric policy (trained with LoRA unless `policy_full`).
    pub policy: PathBuf,
    /// The generator (frozen): a local folder…
    #[serde(default)]
    pub generator: Option<PathBuf>,
    /// …or an OpenAI-compatible endpoint (`http://host:port/v1`).
    #[serde(default)]
    pub generator_url: Option<String>,
    /// The model name to ask the endpoint for.
    #[serde(default)]
    pub generator_model: Option<String>,
    /// An OpenAI-compatible server that samples the policy's rollouts (vLLM with runtime LoRA
    /// loading, or `optimsyn serve --enable-lora`): before every GRPO step the policy's adapter is
    /// published to it (`OUT/rl/served/`, which the server must be able to read).
    #[serde(default)]
    pub policy_url: Option<String>,
    /// The policy's base model as that server names it.
    #[serde(default)]
    pub policy_model: Option<String>,
    /// The target model whose validation loss the data should lower.
    pub target: PathBuf,
    /// `cpu`, `cuda`, `cuda:N`: where every model runs unless placed below.
    #[serde(default)]
    pub device: DeviceName,
    /// The policy's device (default `device`).
    #[serde(default)]
    pub policy_device: Option<DeviceName>,
    /// The local generator's device (default `device`).
    #[serde(default)]
    pub generator_device: Option<DeviceName>,
    /// The target's device: warm-up, influence, final SFT and evaluation (default `device`).
    #[serde(default)]
    pub target_device: Option<DeviceName>,
}

/// A model of the loop, for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The rubric policy.
    Policy,
    /// The QA generator.
    Generator,
    /// The target.
    Target,
}

impl ModelsConfig {
    /// Where `role` runs: its own `*_device`, else `device`.
    pub fn device_of(&self, role: Role) -> DeviceName {
        let own = match role {
            Role::Policy => self.policy_device,
            Role::Generator => self.generator_device,
            Role::Target => self.target_device,
        };
        own.unwrap_or(self.device)
    }
}

/// Prompt template files (each optional; built-in wording otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PromptsConfig {
    /// Policy system template.
    pub policy_system: Option<PathBuf>,
    /// Policy user template.
    pub policy_user: Option<PathBuf>,
    /// Generator system template.
    pub qa_system: Option<PathBuf>,
    /// Generator user template.
    pub qa_user: Option<PathBuf>,
}

/// The policy's adapter and sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// LoRA rank of the policy adapter. Default 64.
    pub lora_r: usize,
    /// LoRA alpha. Default 128.
    pub lora_alpha: f64,
    /// Most tokens per rubric. Default 1024.
    pub max_new_tokens: usize,
    /// `enable_thinking` for chat templates that take it (Qwen3). Default false.
    pub enable_thinking: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            lora_r: 64,
            lora_alpha: 128.0,
            max_new_tokens: 1024,
            enable_thinking: false,
        }
    }
}

/// The generator's sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Most tokens per QA pair. Default 2048.
    pub max_new_tokens: usize,
    /// Temperature (0: greedy, the released configuration). Default 0.
    pub temperature: f64,
    /// Attempts until a reply parses. Default 3.
    pub max_attempts: u32,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            max_new_tokens: 2048,
            temperature: 0.0,
            max_attempts: 3,
        }
    }
}

/// The target's warm-up (released configuration by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmupConfig {
    /// LoRA rank. Default 128.
    pub lora_r: usize,
    /// LoRA alpha. Default 512.
    pub lora_alpha: f64,
    /// LoRA dropout. Default 0.1.
    pub lora_dropout: f64,
    /// Learning rate. Default 1e-5.
    pub lr: f64,
    /// Epochs. Default 1.
    pub epochs: usize,
    /// Examples per step. Default 8.
    pub batch_size: usize,
    /// Checkpoints kept (each weighs by its average learning rate). Default 1.
    pub checkpoints: usize,
}

impl WarmupConfig {
    /// The target adapter these settings describe (q/k/v/o).
    pub fn lora(&self) -> optimsyn_lm::LoraConfig {
        optimsyn_lm::LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            ..Default::default()
        }
    }
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            lora_r: 128,
            lora_alpha: 512.0,
            lora_dropout: 0.1,
            lr: 1e-5,
            epochs: 1,
            batch_size: 8,
            checkpoints: 1,
        }
    }
}

/// Influence settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfluenceConfig {
    /// Projection dimension (0: exact). Default 8192.
    pub proj_dim: usize,
    /// `dense` or `sjlt`. Default dense.
    pub projector: ProjectorType,
    /// `max` or `mean` over validation subtasks. Default max.
    pub subtask_agg: SubtaskAgg,
    /// `released` or `bias-corrected`. Default released.
    pub precond: Precond,
    /// Truncate examples to this many tokens.
    pub max_len: Option<usize>,
    /// The target's dtype for influence gradients: `f32`, `bf16` (as LESS), `f16`. Default f32.
    pub dtype: Dtype,
}

impl Default for InfluenceConfig {
    fn default() -> Self {
        InfluenceConfig {
            proj_dim: 8192,
            projector: ProjectorType::Dense,
            subtask_agg: SubtaskAgg::Max,
            precond: Precond::Released,
            max_len: None,
            dtype: Dtype::F32,
        }
    }
}

/// Reward settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// How IF becomes reward. Default normalized.
    pub mode: RewardMode,
    /// Penalty λ of invalid rollouts. Default 0.1.
    pub lambda: f64,
    /// Whether per-subtask influence is compared as scored, or standardized per subtask over the
    /// step's valid rollouts before the subtasks are aggregated. Default raw.
    pub subtask_scale: SubtaskScale,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            mode: RewardMode::Normalized,
            lambda: 0.1,
            subtask_scale: SubtaskScale::Raw,
        }
    }
}

/// How per-subtask influence enters the aggregation that the reward is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SubtaskScale {
    /// As scored (the paper): under max aggregation, the subtask whose validation gradients are
    /// most alike has the largest cosines and wins for almost every rollout.
    #[default]
    Raw,
    /// Each subtask's scores standardized (z-scores) over the step's valid rollouts, then
    /// aggregated: a rollout is paid for standing out on *some* subtask, whichever it is, so no
    /// subtask's larger scale pulls every rollout toward it.
    Standardized,
}

/// Data hygiene: decontamination against the evaluation sets and near-duplicate removal
/// (optimsyn-hygiene), applied to the pool, every GRPO step's samples and the final datasets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HygieneConfig {
    /// Check written data against `data.val`, `data.heldout` and `data.decontaminate`. Default true.
    pub decontaminate: bool,
    /// Word n-gram length. Default 13.
    pub ngram: usize,
    /// A validation prompt shorter than `ngram` words counts when repeated whole and it has at
    /// least this many words. Default 3.
    pub min_words: usize,
    /// What a contaminated sample of the pool or a final dataset becomes: `drop` (rejected,
    /// flagged) or `keep` (flagged). Default drop.
    pub contaminated: OnContaminated,
    /// Give GRPO rollouts whose QA overlaps an evaluation set the invalid reward, so the policy is
    /// not paid for copying the validation set. Default false: counted and flagged only.
    pub penalize_rollouts: bool,
    /// Near-duplicate removal in the pool and final datasets at this estimated Jaccard similarity
    /// (MinHash over word pairs; 0 turns it off). Default 0.8.
    pub dedup_threshold: f64,
}

impl Default for HygieneConfig {
    fn default() -> Self {
        HygieneConfig {
            decontaminate: true,
            ngram: 13,
            min_words: 3,
            contaminated: OnContaminated::Drop,
            penalize_rollouts: false,
            dedup_threshold: 0.8,
        }
    }
}

/// Stage 3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthesizeConfig {
    /// Rubrics per seed document. Default 1.
    pub rubrics_per_seed: usize,
    /// Rubric sampling temperature. Default 1.0.
    pub temperature: f64,
    /// Score the dataset's influence on the validation set (at the warm-up checkpoint) for its
    /// card and rows. Default true.
    pub score_influence: bool,
}

impl Default for SynthesizeConfig {
    fn default() -> Self {
        SynthesizeConfig {
            rubrics_per_seed: 1,
            temperature: 1.0,
            score_influence: true,
        }
    }
}

/// One OptimSyn run. Relative paths are relative to the config file's folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Output folder (resumable: rerunning continues where it stopped).
    pub out: PathBuf,
    /// Run seed. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Data.
    pub data: DataConfig,
    /// Models.
    pub models: ModelsConfig,
    /// Prompt templates.
    #[serde(default)]
    pub prompts: PromptsConfig,
    /// Policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Generator.
    #[serde(default)]
    pub generator: GeneratorConfig,
    /// Warm-up.
    #[serde(default)]
    pub warmup: WarmupConfig,
    /// Influence.
    #[serde(default)]
    pub influence: InfluenceConfig,
    /// Reward.
    #[serde(default)]
    pub reward: RewardConfig,
    /// GRPO (optimsyn-rl-grpo's `GrpoConfig`; defaults: the released configuration).
    #[serde(default)]
    pub grpo: GrpoConfig,
    /// GRPO training steps. Default 10.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Stage 3.
    #[serde(default)]
    pub synthesize: SynthesizeConfig,
    /// Data hygiene.
    #[serde(default)]
    pub hygiene: HygieneConfig,
}

fn default_text_field() -> String {
    "text".into()
}
fn default_domain() -> String {
    "general".into()
}
fn default_warmup_fraction() -> f64 {
    0.1
}
fn default_train_fraction() -> f64 {
    0.9
}
fn default_steps() -> u64 {
    10
}

impl RunConfig {
    /// Reads a TOML config; unknown keys and wrong types are errors naming the key; relative
    /// paths are resolved against the file's folder; every input file must exist.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_overrides(path, &[])
    }

    /// [`load`](Self::load) with `KEY=VALUE` overrides applied to the file first (dotted keys,
    /// TOML values; a value that is not TOML is a string), e.g. `steps=20`,
    /// `grpo.optimizer.lr=1e-5`.
    pub fn load_with_overrides(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read config {}: {e}", path.display())))?;
        let bad = |with: &str, e: toml::de::Error| {
            Error::Config(format!(
                "{}{with}: {}",
                path.display(),
                e.to_string().trim()
            ))
        };
        // Names the key of a bad value (TOML's own message names only its line and column).
        let parse = |text: &str, with: &str| -> Result<RunConfig> {
            let de = toml::de::Deserializer::parse(text).map_err(|e| bad(with, e))?;
            serde_path_to_error::deserialize(de).map_err(|e| match e.path().to_string() {
                key if key == "." || key.is_empty() => bad(with, e.into_inner()),
                key => bad(&format!("{with}: key `{key}`"), e.into_inner()),
            })
        };
        // Without overrides the file is parsed as it is, so errors point at its line.
        let mut cfg: RunConfig = if sets.is_empty() {
            parse(&text, "")?
        } else {
            let mut doc: toml::Table = toml::from_str(&text).map_err(|e| bad("", e))?;
            for s in sets {
                apply_override(&mut doc, s)?;
            }
            let merged = toml::to_string(&doc)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            parse(&merged, " with --set")?
        };
        cfg.resolve(path.parent().unwrap_or(Path::new(".")));
        cfg.check()
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.out);
        fix(&mut self.data.seeds);
        fix(&mut self.data.val);
        if let Some(h) = self.data.heldout.as_mut() {
            fix(h);
        }
        self.data.decontaminate.iter_mut().for_each(fix);
        fix(&mut self.models.policy);
        fix(&mut self.models.target);
        if let Some(g) = self.models.generator.as_mut() {
            fix(g);
        }
        for p in [
            &mut self.prompts.policy_system,
            &mut self.prompts.policy_user,
            &mut self.prompts.qa_system,
            &mut self.prompts.qa_user,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// Checks values and that input files exist, naming the key.
    pub fn check(&self) -> Result<()> {
        let exists = |key: &str, p: &Path| -> Result<()> {
            ensure!(p.exists(), "key `{key}`: {} does not exist", p.display());
            Ok(())
        };
        exists("data.seeds", &self.data.seeds)?;
        exists("data.val", &self.data.val)?;
        if let Some(h) = &self.data.heldout {
            exists("data.heldout", h)?;
        }
        for p in &self.data.decontaminate {
            exists("data.decontaminate", p)?;
        }
        let h = &self.hygiene;
        ensure!(h.ngram >= 1, "key `hygiene.ngram`: must be at least 1");
        ensure!(
            (0.0..=1.0).contains(&h.dedup_threshold),
            "key `hygiene.dedup_threshold`: must be in [0, 1] (0: off), got {}",
            h.dedup_threshold
        );
        exists("models.policy", &self.models.policy)?;
        exists("models.target", &self.models.target)?;
        match (&self.models.generator, &self.models.generator_url) {
            (Some(g), None) => exists("models.generator", g)?,
            (None, Some(_)) => ensure!(
                self.models.generator_model.is_some(),
                "key `models.generator_model`: required with `models.generator_url`"
            ),
            _ => bail!("key `models.generator` / `models.generator_url`: give exactly one"),
        }
        if self.models.policy_url.is_some() {
            ensure!(
                self.models.policy_model.is_some(),
                "key `models.policy_model`: required with `models.policy_url`"
            );
        }
        for (k, p) in [
            ("prompts.policy_system", &self.prompts.policy_system),
            ("prompts.policy_user", &self.prompts.policy_user),
            ("prompts.qa_system", &self.prompts.qa_system),
            ("prompts.qa_user", &self.prompts.qa_user),
        ] {
            if let Some(p) = p {
                exists(k, p)?;
            }
        }
        ensure!(
            self.data.warmup_fraction > 0.0 && self.data.warmup_fraction <= 1.0,
            "key `data.warmup_fraction`: must be in (0, 1], got {}",
            self.data.warmup_fraction
        );
        ensure!(
            self.data.train_fraction > 0.0 && self.data.train_fraction <= 1.0,
            "key `data.train_fraction`: must be in (0, 1], got {}",
            self.data.train_fraction
        );
        self.grpo
            .validate()
            .map_err(|e| Error::Config(format!("section `grpo`: {e}")))?;
        Ok(())
    }
}

/// Sets one dotted `KEY=VALUE` in a parsed config file.
fn apply_override(doc: &mut toml::Table, s: &str) -> Result<()> {
    let Some((key, value)) = s.split_once('=') else {
        bail!("--set {s}: expected KEY=VALUE");
    };
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let (last, sections) = parts.split_last().unwrap_or((&"", &[]));
    ensure!(!last.is_empty(), "--set {s}: empty key");
    let mut table = doc;
    for p in sections {
        let Some(t) = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
        else {
            bail!("--set {s}: `{p}` is not a section");
        };
        table = t;
    }
    table.insert(last.to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        for f in ["seeds.jsonl", "val.jsonl"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        for d in ["policy", "gen", "target"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let p = dir.join("run.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    const OK: &str = r#"
out = "out"
[data]
seeds = "seeds.jsonl"
val = "val.jsonl"
[models]
policy = "policy"
generator = "gen"
target = "target"
[grpo]
prompts_per_step = 4
mini_batch_prompts = 2
"#;

    #[test]
    fn a_good_config_loads_with_the_released_defaults_and_resolved_paths() {
        let dir = tempfile::tempdir().unwrap();
        let c = RunConfig::load(&write(dir.path(), OK)).unwrap();
        assert_eq!(c.out, dir.path().join("out"));
        assert_eq!(
            (c.warmup.lora_r, c.warmup.lr, c.influence.proj_dim),
            (128, 1e-5, 8192)
        );
        assert_eq!(
            (
                c.grpo.group_size,
                c.grpo.rollout.temperature,
                c.grpo.optimizer.lr
            ),
            (5, 1.5, 1e-6)
        );
        assert_eq!(c.reward.mode, RewardMode::Normalized);
        assert_eq!(c.models.device_of(Role::Target), DeviceName::Cpu);
        let placed = OK.replace(
            "target = \"target\"",
            "target = \"target\"\ndevice = \"cuda:1\"\npolicy_device = \"cpu\"",
        );
        let c = RunConfig::load(&write(dir.path(), &placed)).unwrap();
        assert_eq!(
            [Role::Policy, Role::Generator, Role::Target].map(|r| c.models.device_of(r)),
            [DeviceName::Cpu, DeviceName::Cuda(1), DeviceName::Cuda(1)]
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (OK.replace("[data]", "[data]\nsedes = \"x\""), "sedes"),
            (
                OK.replace("seeds = \"seeds.jsonl\"", "seeds = \"nope.jsonl\""),
                "data.seeds",
            ),
            (
                OK.replace("out = \"out\"", "out = \"out\"\nsteps = \"many\""),
                "steps",
            ),
            (OK.replace("generator = \"gen\"", ""), "models.generator"),
            (
                OK.replace("[grpo]", "[reward]\nmode = \"fancy\"\n[grpo]"),
                "fancy",
            ),
            (
                OK.replace("mini_batch_prompts = 2", "mini_batch_prompts = 3"),
                "mini_batch_prompts",
            ),
            (
                OK.replace(
                    "target = \"target\"",
                    "target = \"target\"\ntarget_device = \"gpu1\"",
                ),
                "models.target_device",
            ),
            (
                OK.replace("[grpo]", "[hygiene]\ndedup_threshold = 1.5\n[grpo]"),
                "hygiene.dedup_threshold",
            ),
            (
                OK.replace("[grpo]", "[influence]\ndtype = \"f8\"\n[grpo]"),
                "influence.dtype",
            ),
            (
                OK.replace("[data]", "[data]\ndecontaminate = [\"missing.jsonl\"]"),
                "data.decontaminate",
            ),
        ];
        for (body, key) in cases {
            let err = RunConfig::load(&write(dir.path(), &body))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
            assert!(err.contains("run.toml"), "{err}");
        }
    }

    #[test]
    fn overrides_set_dotted_keys_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), OK);
        let sets = [
            "steps=7",
            "grpo.optimizer.lr=0.5",
            "influence.projector=sjlt",
        ]
        .map(String::from);
        let cfg = RunConfig::load_with_overrides(&path, &sets).unwrap();
        assert_eq!(cfg.steps, 7);
        assert_eq!(cfg.grpo.optimizer.lr, 0.5);
        assert_eq!(cfg.influence.projector, ProjectorType::Sjlt);
        // Relative paths still resolve against the file's folder.
        assert_eq!(cfg.out, dir.path().join("out"));
        for (set, named) in [
            ("steps", "expected KEY=VALUE"),
            ("out.x=1", "`out` is not a section"),
            ("stepz=1", "stepz"),
            ("influence.projector=fancy", "influence.projector"),
        ] {
            let err = RunConfig::load_with_overrides(&path, &[set.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{set}: {err}");
        }
    }
}
