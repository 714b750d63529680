//! LoRA adapters with PEFT's semantics and file layout.
//!
//! An adapted projection computes `x Wᵀ + b + s · B (A · dropout(x))` with `A: [r, in]`,
//! `B: [out, r]` and `s = alpha / r` (or `alpha / √r` with rank-stabilized scaling), exactly as
//! PEFT's `lora.Linear`. Adapters are written and read in PEFT's layout: `adapter_config.json`
//! and `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (no adapter
//! name), so an adapter trained here loads in PEFT and the other way round.
//!
//! Target modules follow PEFT's matching: a list matches a module whose name equals an entry or
//! ends in `.entry`; a single string is a regular expression that must match the whole name;
//! `"all-linear"` is every projection of the decoder blocks. `layers_to_transform`,
//! `rank_pattern` and `alpha_pattern` are honoured; features this crate does not implement
//! (DoRA, LoRA biases, `modules_to_save`, fan-in-fan-out weights) are refused when loading.
//!
//! Dropout masks come from per-row ChaCha streams keyed by `(seed, step, row key, layer)`, so a
//! row's mask does not depend on its batch (see [`LoraAdapter::set_dropout`]); without a key,
//! dropout is off (evaluation, scoring, influence).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::model::{CausalLm, Linear, LinearAdapter};
use crate::save::{safetensors_bytes, write_atomic};
use crate::weights::WeightStore;

/// File name of the adapter's configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before a module path in adapter files.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Which modules to adapt: a list of names (PEFT's suffix match) or one regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched exactly or as the last components (`q_proj` matches
    /// `model.layers.0.self_attn.q_proj`). `all-linear` as the only entry means every projection.
    List(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex(String),
}

impl Default for TargetModules {
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj` (the OptimSyn warm-up's targets).
    fn default() -> Self {
        TargetModules::List(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        )
    }
}

/// LoRA hyperparameters, serialized as PEFT's `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub r: usize,
    /// `lora_alpha`; the scale is `alpha / r` (or `alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// Modules to adapt.
    pub target_modules: TargetModules,
    /// Rank-stabilized scaling `alpha / √r`.
    pub use_rslora: bool,
    /// Only adapt these decoder layers (all when `None`).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides, PEFT's `rank_pattern` (key: a module-name pattern).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, PEFT's `alpha_pattern`.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `base_model_name_or_path` written into the config (informational).
    pub base_model: Option<String>,
}

impl Default for LoraConfig {
    /// r 8, alpha 16, dropout 0, q/k/v/o.
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            layers_to_transform: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model: None,
        }
    }
}

/// Matches PEFT's `rank_pattern` / `alpha_pattern` keys: the pattern must match the end of the
/// module path at a component boundary.
fn pattern_matches(pattern: &str, module: &str) -> Result<bool> {
    let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
        .map_err(|e| Error::input(format!("bad module pattern `{pattern}`: {e}")))?;
    Ok(re.is_match(module))
}

/// The decoder layer index in a module path such as `model.layers.3.mlp.up_proj`.
fn layer_index(module: &str) -> Option<usize> {
    let mut parts = module.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

impl LoraConfig {
    /// Rejects settings no LoRA can have.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::input("LoRA rank r must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::input(format!(
                "lora_alpha must be positive, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::input(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let TargetModules::Regex(re) = &self.target_modules {
            regex::Regex::new(re)
                .map_err(|e| Error::input(format!("target_modules regex `{re}`: {e}")))?;
        }
        Ok(())
    }

    /// Whether `module` (a full path like `model.layers.0.self_attn.q_proj`) is adapted.
    pub fn targets(&self, module: &str) -> Result<bool> {
        let hit = match &self.target_modules {
            TargetModules::List(names) if names.len() == 1 && names[0] == "all-linear" => true,
            TargetModules::List(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetModules::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| Error::input(format!("target_modules regex `{re}`: {e}")))?
                .is_match(module),
        };
        if !hit {
            return Ok(false);
        }
        Ok(match &self.layers_to_transform {
            None => true,
            Some(layers) => layer_index(module).is_some_and(|i| layers.contains(&i)),
        })
    }

    /// Rank and scale of one adapted module (patterns first, as PEFT resolves them).
    pub fn rank_and_scale(&self, module: &str) -> Result<(usize, f64)> {
        let mut r = self.r;
        for (p, v) in &self.rank_pattern {
            if pattern_matches(p, module)? {
                r = *v;
                break;
            }
        }
        let mut alpha = self.alpha;
        for (p, v) in &self.alpha_pattern {
            if pattern_matches(p, module)? {
                alpha = *v;
                break;
            }
        }
        if r == 0 {
            return Err(Error::input(format!(
                "rank_pattern gives module `{module}` rank 0"
            )));
        }
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Ok((r, scale))
    }

    /// The `adapter_config.json` PEFT writes for this configuration.
    pub fn to_peft_json(&self) -> Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "layers_to_transform": self.layers_to_transform,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "use_dora": false,
            "revision": null,
        })
    }

    /// Reads PEFT's `adapter_config.json`, refusing what this crate cannot reproduce exactly.
    pub fn from_peft_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |field: &str, message: String| Error::Adapter {
            path: path.to_path_buf(),
            message: format!("field `{field}`: {message}"),
        };
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Adapter {
            path: path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        if !v.is_object() {
            return Err(bad("(root)", "expected a JSON object".into()));
        }
        let p: PeftConfig = serde_path_to_error::deserialize(v).map_err(|e| {
            let field = e.path().to_string();
            let message = if field == "target_modules" {
                "expected a list of names or a regex string".to_string()
            } else {
                e.inner().to_string()
            };
            bad(&field, message)
        })?;
        p.refuse_unsupported().map_err(|(f, m)| bad(f, m))?;
        let cfg = LoraConfig {
            r: p.r
                .ok_or_else(|| bad("r", "missing or not a positive integer".into()))?,
            alpha: p.lora_alpha.unwrap_or(8.0),
            dropout: p.lora_dropout.unwrap_or(0.0),
            target_modules: p
                .target_modules
                .ok_or_else(|| bad("target_modules", "missing".into()))?,
            use_rslora: p.use_rslora.unwrap_or(false),
            layers_to_transform: p.layers_to_transform.map(|l| match l {
                Layers::One(i) => vec![i],
                Layers::Many(v) => v,
            }),
            rank_pattern: p.rank_pattern.unwrap_or_default(),
            alpha_pattern: p.alpha_pattern.unwrap_or_default(),
            base_model: p.base_model_name_or_path,
        };
        cfg.validate().map_err(|e| Error::Adapter {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }
}

/// The fields of PEFT's `adapter_config.json` this crate reads, or refuses when set (LoRA
/// variants it cannot reproduce); a missing or `null` field takes PEFT's default, other fields
/// are ignored.
#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f64>,
    target_modules: Option<TargetModules>,
    use_rslora: Option<bool>,
    layers_to_transform: Option<Layers>,
    rank_pattern: Option<BTreeMap<String, usize>>,
    alpha_pattern: Option<BTreeMap<String, f64>>,
    base_model_name_or_path: Option<String>,
    bias: Option<String>,
    use_dora: Option<bool>,
    fan_in_fan_out: Option<bool>,
    lora_bias: Option<bool>,
    use_qalora: Option<bool>,
    use_bdlora: Option<bool>,
    modules_to_save: Option<Value>,
    target_parameters: Option<Value>,
    trainable_token_indices: Option<Value>,
    layer_replication: Option<Value>,
    exclude_modules: Option<Value>,
}

/// `layers_to_transform`: one index or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Layers {
    One(usize),
    Many(Vec<usize>),
}

impl PeftConfig {
    /// The first setting this crate cannot reproduce exactly, as (field, why).
    fn refuse_unsupported(&self) -> std::result::Result<(), (&'static str, String)> {
        if let Some(t) = self.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(("peft_type", format!("`{t}` is not LORA")));
        }
        for (k, on) in [
            ("use_dora", self.use_dora),
            ("fan_in_fan_out", self.fan_in_fan_out),
            ("lora_bias", self.lora_bias),
            ("use_qalora", self.use_qalora),
            ("use_bdlora", self.use_bdlora),
        ] {
            if on == Some(true) {
                return Err((k, "true is not supported".into()));
            }
        }
        if let Some(b) = self.bias.as_deref().filter(|b| *b != "none") {
            return Err(("bias", format!("`{b}` is not supported (only \"none\")")));
        }
        let nonempty = |v: &Option<Value>| {
            v.as_ref()
                .filter(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .cloned()
        };
        if let Some(m) = nonempty(&self.modules_to_save) {
            return Err((
                "modules_to_save",
                format!("{m}: fully trained extra modules are not supported"),
            ));
        }
        for (k, v) in [
            ("target_parameters", &self.target_parameters),
            ("trainable_token_indices", &self.trainable_token_indices),
            ("layer_replication", &self.layer_replication),
            ("exclude_modules", &self.exclude_modules),
        ] {
            if let Some(v) = nonempty(v) {
                return Err((k, format!("{v}: not supported")));
            }
        }
        Ok(())
    }
}

/// State shared by every layer of one adapter: dropout keys, and the per-sample-gradient probes.
#[derive(Debug, Default)]
struct DropoutKey {
    /// `(seed, step)` while training; `None` turns dropout off.
    key: Option<(u64, u64)>,
    /// One stream key per batch row (see [`crate::row_key`]).
    rows: Vec<u64>,
    /// While capturing per-sample gradients: one slot per adapted module.
    probes: Option<Vec<Option<Captured>>>,
    /// The adapter is bypassed (the base model computes alone).
    disabled: bool,
}

/// What one adapted module saw in a probed forward: its input `x` `[B, T, in]`, the low-rank
/// activation `h = x Aᵀ` `[B, T, r]`, and a zero tensor added to its output whose gradient is the
/// loss's gradient with respect to that output.
#[derive(Debug)]
struct Captured {
    x: Tensor,
    h: Tensor,
    probe: Tensor,
}

/// One adapted projection's trainable matrices, as attached to a [`Linear`].
#[derive(Debug)]
struct LoraLayer {
    /// `[r, in]`.
    a: Tensor,
    /// `[out, r]`.
    b: Tensor,
    scale: f64,
    dropout: f64,
    /// Position among the adapter's layers: selects the dropout stream.
    index: u64,
    key: Arc<Mutex<DropoutKey>>,
}

impl LoraLayer {
    fn dropout_mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.dropout == 0.0 {
            return Ok(None);
        }
        let guard = self
            .key
            .lock()
            .map_err(|_| Error::input("LoRA dropout state poisoned by a panic"))?;
        let Some((seed, step)) = guard.key else {
            return Ok(None);
        };
        let size = x.size();
        let (rows, per_row) = match size.as_slice() {
            [b, rest @ ..] => (*b as usize, rest.iter().product::<i64>() as usize),
            [] => return Err(Error::input("LoRA input is a scalar")),
        };
        if guard.rows.len() != rows {
            return Err(Error::input(format!(
                "LoRA dropout has {} row keys for a batch of {rows} rows (call set_dropout with the batch's keys)",
                guard.rows.len()
            )));
        }
        let keep = 1.0 - self.dropout;
        let mut mask = Vec::with_capacity(rows * per_row);
        for &row in &guard.rows {
            let mut rng =
                ChaCha8Rng::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            rng.set_stream(row.rotate_left(17) ^ self.index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
            // Row-major over [T, in]: with right padding a token's mask does not depend on how
            // much padding follows it.
            mask.extend((0..per_row).map(|_| {
                let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
                if u < keep as f32 {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            }));
        }
        let t = Tensor::f_from_slice(&mask)
            .and_then(|m| {
                m.f_view(size.as_slice())?
                    .f_to_kind(x.kind())?
                    .f_to_device(x.device())
            })
            .op("LoRA dropout mask")?;
        Ok(Some(t))
    }
}

/// `base + scale · h Bᵀ` as one `addmm` over flattened rows, the scale applied to the r-wide `h`
/// rather than the out-wide product: two fewer passes over `[rows, out]` forward, and none of the
/// matching backward ones (the same sum as PEFT's `(h Bᵀ) · scale` up to rounding).
fn add_delta(
    base: &Tensor,
    h: &Tensor,
    b: &Tensor,
    scale: f64,
) -> std::result::Result<Tensor, tch::TchError> {
    if !base.is_contiguous() {
        // The small-batch `W·xᵀ` path returns a transposed layout; `addmm` would return a
        // contiguous one, and downstream kernels round differently over the two: keep the
        // layout, so an adapter with B = 0 leaves the model's outputs bit-identical.
        return base.f_add(&h.f_matmul(&b.f_tr()?)?.f_mul_scalar(scale)?);
    }
    let shape = base.size();
    let out = shape.last().copied().unwrap_or(1);
    let r = h.size().last().copied().unwrap_or(1);
    base.f_reshape([-1, out])?
        .f_addmm(&h.f_reshape([-1, r])?.f_mul_scalar(scale)?, &b.f_tr()?)?
        .f_reshape(shape.as_slice())
}

impl LinearAdapter for LoraLayer {
    fn forward(&self, x: &Tensor, base: Tensor) -> Result<Tensor> {
        {
            let mut g = self
                .key
                .lock()
                .map_err(|_| Error::input("LoRA state poisoned by a panic"))?;
            if g.disabled {
                return Ok(base);
            }
            if let Some(slots) = g.probes.as_mut() {
                // Dropout is off while probing (influence uses the deterministic model).
                let f = || -> std::result::Result<(Tensor, Captured), tch::TchError> {
                    let h = x.f_matmul(&self.a.f_tr()?)?;
                    let out = add_delta(&base, &h, &self.b, self.scale)?;
                    let probe = out.f_zeros_like()?.set_requires_grad(true);
                    let out = out.f_add(&probe)?;
                    Ok((
                        out,
                        Captured {
                            x: x.f_detach()?,
                            h: h.f_detach()?,
                            probe,
                        },
                    ))
                };
                let (out, cap) = f().op("LoRA probed forward")?;
                if let Some(slot) = slots.get_mut(self.index as usize) {
                    *slot = Some(cap);
                }
                return Ok(out);
            }
        }
        let f = |x: &Tensor| -> std::result::Result<Tensor, tch::TchError> {
            let h = x.f_matmul(&self.a.f_tr()?)?;
            add_delta(&base, &h, &self.b, self.scale)
        };
        match self.dropout_mask(x)? {
            None => f(x).op("LoRA forward"),
            Some(m) => f(&x.f_mul(&m).op("LoRA dropout")?).op("LoRA forward"),
        }
    }
}

/// One adapted module's parameters, with the keys PEFT uses for them.
#[derive(Debug)]
pub struct LoraModule {
    /// Module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[r, in]`, requires grad.
    pub a: Tensor,
    /// `[out, r]`, requires grad.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f64,
}

impl LoraModule {
    /// `base_model.model.<module>.lora_A.weight`.
    pub fn key_a(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_A.weight", self.module)
    }

    /// `base_model.model.<module>.lora_B.weight`.
    pub fn key_b(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_B.weight", self.module)
    }
}

/// A LoRA adapter attached to a [`CausalLm`]: its configuration and every adapted module's
/// trainable matrices (shared with the layers they are attached to, so an optimizer step on them
/// changes the model's forward).
#[derive(Debug)]
pub struct LoraAdapter {
    config: LoraConfig,
    modules: Vec<LoraModule>,
    key: Arc<Mutex<DropoutKey>>,
}

/// The adapter is bypassed while this lives (see [`LoraAdapter::bypass`]).
#[must_use = "the adapter is restored as soon as the guard is dropped"]
#[derive(Debug)]
pub struct Bypassed<'a> {
    adapter: &'a LoraAdapter,
}

impl Drop for Bypassed<'_> {
    fn drop(&mut self) {
        self.adapter.state().disabled = false;
    }
}

/// Keyed dropout is on while this lives (see [`LoraAdapter::dropout`]).
#[must_use = "dropout is turned off as soon as the guard is dropped"]
#[derive(Debug)]
pub struct DropoutOn<'a> {
    adapter: &'a LoraAdapter,
}

impl Drop for DropoutOn<'_> {
    fn drop(&mut self) {
        let mut g = self.adapter.state();
        g.key = None;
        g.rows.clear();
    }
}

/// How one module's matrices are obtained while attaching.
enum Source<'a> {
    /// PEFT's default init from a seeded stream: A ~ U(±1/√in) (kaiming-uniform, a = √5), B = 0.
    Init(u64),
    /// From an adapter file.
    File(&'a WeightStore, &'a Path),
}

impl LoraAdapter {
    /// Attaches a fresh adapter to every targeted projection of `model`, initialized as PEFT does
    /// (A kaiming-uniform, B zero, so the adapted model starts equal to the base) from `seed`.
    /// Base weights are frozen.
    pub fn init(model: &mut CausalLm, config: LoraConfig, seed: u64) -> Result<Self> {
        Self::attach(model, config, Source::Init(seed))
    }

    /// Loads a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) and attaches
    /// it. Every tensor must match a targeted module with the configured rank: a missing,
    /// unexpected or misshapen tensor is an error naming it (an adapter for another architecture or
    /// rank does not load).
    pub fn load(model: &mut CausalLm, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let config = LoraConfig::from_peft_json(&text, &cfg_path)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.exists() {
            let bin = dir.join("adapter_model.bin");
            let hint = if bin.exists() {
                " (only the pickle adapter_model.bin is there: re-save it with safetensors)"
            } else {
                ""
            };
            return Err(Error::Adapter {
                path: weights,
                message: format!("missing{hint}"),
            });
        }
        let store = WeightStore::open_file(&weights)?;
        Self::attach(model, config, Source::File(&store, &weights))
    }

    fn attach(model: &mut CausalLm, config: LoraConfig, source: Source<'_>) -> Result<Self> {
        let had: Vec<bool> = model
            .linear_layers_mut()
            .iter()
            .map(|l| l.adapter.is_some())
            .collect();
        let attached = Self::attach_layers(model, config, source);
        if attached.is_err() {
            // A load that failed part way leaves the model as it was.
            for (lin, had) in model.linear_layers_mut().into_iter().zip(had) {
                if !had {
                    lin.adapter = None;
                }
            }
        }
        attached
    }

    fn attach_layers(model: &mut CausalLm, config: LoraConfig, source: Source<'_>) -> Result<Self> {
        config.validate()?;
        let (kind, device) = (model.kind(), model.device());
        for (_, p) in model.named_parameters() {
            // Frozen base: the adapter's matrices are the only trainable tensors.
            let _ = p.shallow_clone().set_requires_grad(false);
        }
        let key = Arc::new(Mutex::new(DropoutKey::default()));
        let mut modules = Vec::new();
        let mut taken = std::collections::BTreeSet::new();
        let mut layers: Vec<&mut Linear> = model.linear_layers_mut();
        for lin in layers.iter_mut() {
            if !config.targets(&lin.name)? {
                continue;
            }
            if lin.adapter.is_some() {
                return Err(Error::input(format!(
                    "module `{}` already has an adapter",
                    lin.name
                )));
            }
            let (r, scale) = config.rank_and_scale(&lin.name)?;
            let size = lin.weight.size();
            let (out, inp) = (size[0], size[1]);
            let r = r as i64;
            let index = modules.len() as u64;
            let (a, b) = match &source {
                Source::Init(seed) => {
                    let bound = 1.0 / (inp as f64).sqrt();
                    let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                    rng.set_stream(index);
                    let vals: Vec<f32> = (0..r * inp)
                        .map(|_| {
                            let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                            ((2.0 * u - 1.0) * bound) as f32
                        })
                        .collect();
                    let a = Tensor::f_from_slice(&vals)
                        .and_then(|t| t.f_view([r, inp])?.f_to_kind(kind)?.f_to_device(device))
                        .op("LoRA init")?;
                    let b = Tensor::f_zeros([out, r], (kind, device)).op("LoRA init")?;
                    (a, b)
                }
                Source::File(store, path) => {
                    let take = |name: String, shape: [i64; 2]| -> Result<Tensor> {
                        let Some((_, info)) = store.info(&name) else {
                            return Err(Error::weight(
                                *path,
                                &name,
                                format!("missing: adapter_config.json targets `{}`", lin.name),
                            ));
                        };
                        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
                        if found != shape {
                            return Err(Error::weight(
                                *path,
                                &name,
                                format!(
                                    "shape {found:?}, but the model and adapter_config.json (r = {r}) imply {shape:?}"
                                ),
                            ));
                        }
                        store.load(&name, kind, device)
                    };
                    let ka = format!("{KEY_PREFIX}{}.lora_A.weight", lin.name);
                    let kb = format!("{KEY_PREFIX}{}.lora_B.weight", lin.name);
                    let a = take(ka.clone(), [r, inp])?;
                    let b = take(kb.clone(), [out, r])?;
                    taken.insert(ka);
                    taken.insert(kb);
                    (a, b)
                }
            };
            let a = a.set_requires_grad(true);
            let b = b.set_requires_grad(true);
            lin.adapter = Some(Box::new(LoraLayer {
                a: a.shallow_clone(),
                b: b.shallow_clone(),
                scale,
                dropout: config.dropout,
                index,
                key: key.clone(),
            }));
            modules.push(LoraModule {
                module: lin.name.clone(),
                a,
                b,
                scale,
            });
        }
        drop(layers);
        if modules.is_empty() {
            return Err(Error::input(format!(
                "LoRA target_modules {:?} match no projection of this {} model",
                config.target_modules,
                model.config().architecture.model_type()
            )));
        }
        if let Source::File(store, path) = source
            && let Some(extra) = store.names().find(|n| !taken.contains(*n))
        {
            return Err(Error::weight(
                path,
                extra,
                "unexpected: no targeted module of this model has that name (an adapter for another architecture or config?)",
            ));
        }
        Ok(LoraAdapter {
            config,
            modules,
            key,
        })
    }

    /// The adapter's configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The adapted modules, in model order.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Every trainable tensor with its PEFT file key, A before B per module.
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        self.modules
            .iter()
            .flat_map(|m| [(m.key_a(), &m.a), (m.key_b(), &m.b)])
            .collect()
    }

    /// Number of trainable values.
    pub fn num_parameters(&self) -> i64 {
        self.modules
            .iter()
            .map(|m| m.a.numel() as i64 + m.b.numel() as i64)
            .sum()
    }

    /// Bypasses the adapter until the returned guard is dropped (PEFT's `disable_adapter`
    /// context): the model computes as its base, e.g. for a KL reference. The adapter comes back
    /// however the scope ends (`?`, early return, panic), which [`set_enabled`](Self::set_enabled)
    /// alone does not promise.
    pub fn bypass(&self) -> Result<Bypassed<'_>> {
        self.set_enabled(false)?;
        Ok(Bypassed { adapter: self })
    }

    /// Keyed dropout (see [`set_dropout`](Self::set_dropout)) until the returned guard is
    /// dropped; then dropout is off again, however the scope ends.
    pub fn dropout(&self, key: (u64, u64), rows: &[u64]) -> Result<DropoutOn<'_>> {
        self.set_dropout(Some(key), rows)?;
        Ok(DropoutOn { adapter: self })
    }

    /// The shared state, also after a panic elsewhere poisoned it (what the guards restore is
    /// plain data, valid in any state).
    fn state(&self) -> std::sync::MutexGuard<'_, DropoutKey> {
        self.key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bypasses (`false`) or restores (`true`) the adapter in every forward: with it bypassed the
    /// model computes as its base (PEFT's `disable_adapter`), e.g. for a KL reference. Prefer
    /// [`bypass`](Self::bypass), which restores it when its scope ends.
    pub fn set_enabled(&self, enabled: bool) -> Result<()> {
        let mut g = self
            .key
            .lock()
            .map_err(|_| Error::input("LoRA state poisoned by a panic"))?;
        g.disabled = !enabled;
        Ok(())
    }

    /// Turns dropout on for the next forwards with masks keyed by `(seed, step, row key, layer)`;
    /// `rows` holds one key per batch row. `None` turns it off.
    pub fn set_dropout(&self, key: Option<(u64, u64)>, rows: &[u64]) -> Result<()> {
        let mut g = self
            .key
            .lock()
            .map_err(|_| Error::input("LoRA dropout state poisoned by a panic"))?;
        g.key = key;
        g.rows = rows.to_vec();
        Ok(())
    }

    /// Per-sample gradients of each row's loss (the per-sample mean token cross-entropy of
    /// [`CausalLm::per_sample_loss`]) with respect to every adapter parameter, for a whole padded
    /// batch in one backward pass: `[B, P]` with columns in [`LoraAdapter::named_parameters`]
    /// order (each matrix flattened row-major). Dropout is off. Returns the gradients and each
    /// row's loss.
    ///
    /// How: a zero probe is added to each adapted module's output; the gradient of the summed
    /// loss with respect to the probes is each module's output gradient δ `[B, T, out]`, and since
    /// rows do not interact, `∇B_b = s Σₜ δ_bt h_btᵀ` and `∇A_b = s Σₜ (Bᵀ δ_bt) x_btᵀ` with
    /// `h = x Aᵀ` separate the rows exactly. Padding and rows without loss tokens contribute 0.
    pub fn per_sample_grads(
        &self,
        model: &CausalLm,
        batch: &crate::loss::LossBatch,
    ) -> Result<(Tensor, Vec<f32>)> {
        let rows = batch.counts.len() as i64;
        let kind = self.modules.first().map_or(Kind::Float, |m| m.b.kind());
        let out = Tensor::f_empty([rows, self.num_parameters()], (kind, model.device()))
            .op("per-sample gradients")?;
        let losses = self.per_sample_grads_into(model, batch, &out)?;
        Ok((out, losses))
    }

    /// [`LoraAdapter::per_sample_grads`] written into `out` (`[B, P]`, rows contiguous, e.g.
    /// `narrow(0, …)` of a larger buffer, in the adapter's kind and on its device): each module's
    /// blocks are computed straight into their columns, with no per-module temporaries or
    /// concatenation. Returns each row's loss.
    pub fn per_sample_grads_into(
        &self,
        model: &CausalLm,
        batch: &crate::loss::LossBatch,
        out: &Tensor,
    ) -> Result<Vec<f32>> {
        let want = [batch.counts.len() as i64, self.num_parameters()];
        if out.size() != want || out.stride().last() != Some(&1) {
            return Err(Error::input(format!(
                "per-sample gradients need a [{}, {}] output with contiguous rows, got {:?} (strides {:?})",
                want[0],
                want[1],
                out.size(),
                out.stride()
            )));
        }
        {
            let mut g = self
                .key
                .lock()
                .map_err(|_| Error::input("LoRA state poisoned by a panic"))?;
            g.key = None;
            g.probes = Some((0..self.modules.len()).map(|_| None).collect());
        }
        let result = self.probed_grads(model, batch, out);
        if let Ok(mut g) = self.key.lock() {
            g.probes = None;
        }
        result
    }

    fn probed_grads(
        &self,
        model: &CausalLm,
        batch: &crate::loss::LossBatch,
        out: &Tensor,
    ) -> Result<Vec<f32>> {
        let per = model.per_sample_loss(batch)?;
        let losses = crate::generate::to_vec_f32(&per.f_detach().op("per-sample loss")?)?;
        let total = per.f_sum(per.kind()).op("per-sample loss")?;
        let caps: Vec<Captured> = {
            let mut g = self
                .key
                .lock()
                .map_err(|_| Error::input("LoRA state poisoned by a panic"))?;
            let slots = g.probes.take().unwrap_or_default();
            slots
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    c.ok_or_else(|| {
                        Error::input(format!(
                            "adapted module `{}` was not reached by the forward",
                            self.modules[i].module
                        ))
                    })
                })
                .collect::<Result<_>>()?
        };
        let probes: Vec<&Tensor> = caps.iter().map(|c| &c.probe).collect();
        let deltas =
            Tensor::f_run_backward(&[&total], &probes, false, false).op("per-sample backward")?;
        let b = batch.counts.len() as i64;
        let mut off = 0i64;
        for ((m, c), delta) in self.modules.iter().zip(&caps).zip(&deltas) {
            let mut f = || -> std::result::Result<(), tch::TchError> {
                let (r, inp) = (m.a.size()[0], m.a.size()[1]);
                let outf = m.b.size()[0];
                // The scale goes on the r-wide factors, not on the [out, r] / [r, in] products.
                // ∇A: (s δ B)ᵀ [B, r, T] · x [B, T, in] = [B, r, in]
                let db = delta.f_matmul(&m.b.f_detach()?)?.f_mul_scalar(m.scale)?;
                let ga = out.f_narrow(1, off, r * inp)?.f_view([b, r, inp])?;
                let _ = db.f_transpose(1, 2)?.f_bmm_out(&ga, &c.x)?;
                off += r * inp;
                // ∇B: δᵀ [B, out, T] · (s h) [B, T, r] = [B, out, r]
                let gb = out.f_narrow(1, off, outf * r)?.f_view([b, outf, r])?;
                let _ = delta
                    .f_transpose(1, 2)?
                    .f_bmm_out(&gb, &c.h.f_mul_scalar(m.scale)?)?;
                off += outf * r;
                Ok(())
            };
            f().op_with(|| format!("per-sample gradient of `{}`", m.module))?;
        }
        Ok(losses)
    }

    /// Replaces the adapter's weights with those of another adapter folder of the same shape (e.g.
    /// another checkpoint of the same run), strictly: the same keys and shapes.
    pub fn load_weights(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let other = LoraConfig::from_peft_json(&text, &cfg_path)?;
        if (other.r, other.alpha, other.use_rslora)
            != (self.config.r, self.config.alpha, self.config.use_rslora)
        {
            return Err(Error::Adapter {
                path: cfg_path,
                message: format!(
                    "r {} / alpha {} / rslora {} differ from the attached adapter's r {} / alpha {} / rslora {}",
                    other.r,
                    other.alpha,
                    other.use_rslora,
                    self.config.r,
                    self.config.alpha,
                    self.config.use_rslora
                ),
            });
        }
        crate::weights::load_into(&dir.join(WEIGHTS_FILE), &self.named_parameters())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) in PEFT's layout,
    /// each atomically.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let named: Vec<(String, Tensor)> = self
            .named_parameters()
            .into_iter()
            .map(|(k, t)| {
                Ok((
                    k,
                    t.f_detach()
                        .and_then(|t| t.f_to_kind(Kind::Float))
                        .op("saving adapter")?,
                ))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors_bytes(&named, None)?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        let cfg = serde_json::to_string_pretty(&self.config.to_peft_json())
            .map_err(|e| Error::input(e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), cfg.as_bytes())
    }

    /// Folds the adapter into the base weights (`W += s · B A`) and removes it from the model,
    /// leaving a plain model to save or serve.
    pub fn merge_into(self, model: &mut CausalLm) -> Result<()> {
        let _g = tch::no_grad_guard();
        let by_name: BTreeMap<&str, &LoraModule> = self
            .modules
            .iter()
            .map(|m| (m.module.as_str(), m))
            .collect();
        for lin in model.linear_layers_mut() {
            if let Some(m) = by_name.get(lin.name.as_str()) {
                let delta =
                    m.b.f_matmul(&m.a)
                        .and_then(|d| d.f_mul_scalar(m.scale))
                        .op("merging LoRA")?;
                let mut w = lin.weight.shallow_clone();
                let _ = w
                    .f_add_(&delta.f_to_kind(w.kind()).op("merging LoRA")?)
                    .op("merging LoRA")?;
                lin.adapter = None;
            }
        }
        Ok(())
    }

    /// Removes the adapter from the model, leaving the base weights unchanged.
    pub fn detach(self, model: &mut CausalLm) {
        detach_all(model);
    }
}

fn detach_all(model: &mut CausalLm) {
    for lin in model.linear_layers_mut() {
        lin.adapter = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> std::result::Result<LoraConfig, String> {
        LoraConfig::from_peft_json(json, Path::new("a/adapter_config.json"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn peft_defaults_and_nulls() {
        let c = read(r#"{"r": 4, "target_modules": ["q_proj"], "lora_alpha": null, "layers_to_transform": 1, "some_new_peft_field": 3}"#)
            .expect("reads");
        assert_eq!((c.r, c.alpha, c.dropout), (4, 8.0, 0.0));
        assert_eq!(c.layers_to_transform, Some(vec![1]));
        let c = read(r#"{"r": 4, "target_modules": "q.*", "layers_to_transform": [0, 2], "modules_to_save": []}"#)
            .expect("reads");
        assert_eq!(c.target_modules, TargetModules::Regex("q.*".into()));
        assert_eq!(c.layers_to_transform, Some(vec![0, 2]));
    }

    #[test]
    fn bad_peft_configs_name_the_file_and_field() {
        for (json, field) in [
            (r#"{"target_modules": ["q_proj"]}"#, "field `r`"),
            (
                r#"{"r": "eight", "target_modules": ["q_proj"]}"#,
                "field `r`",
            ),
            (r#"{"r": 4}"#, "field `target_modules`: missing"),
            (
                r#"{"r": 4, "target_modules": 3}"#,
                "field `target_modules`: expected a list",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "peft_type": "IA3"}"#,
                "field `peft_type`",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "use_dora": true}"#,
                "field `use_dora`",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "bias": "all"}"#,
                "field `bias`",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "modules_to_save": ["lm_head"]}"#,
                "field `modules_to_save`",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "trainable_token_indices": {"embed": [1]}}"#,
                "field `trainable_token_indices`",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "layers_to_transform": "all"}"#,
                "field `layers_to_transform`",
            ),
            (
                r#"{"r": 4, "target_modules": ["q"], "rank_pattern": {"q": -1}}"#,
                "field `rank_pattern",
            ),
            ("[1, 2]", "expected a JSON object"),
            ("{", "not valid JSON"),
        ] {
            let err = read(json).expect_err(json);
            assert!(
                err.contains(field) && err.contains("a/adapter_config.json"),
                "{json}: {err}"
            );
        }
    }
}
