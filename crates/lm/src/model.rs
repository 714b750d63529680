//! Qwen2 / Qwen3 / Llama decoders, top-down: linear layer → RMSNorm → attention → MLP → decoder
//! layer → causal LM. Weight names mirror the Hugging Face checkpoints'.

use std::path::Path;

use optimsyn_data_io::{Architecture, ModelConfig, ModelFolder};
use tch::{Device, Kind, Tensor};

use crate::cache::{KvCache, LayerKv};
use crate::error::{Error, Result, TorchContext};
use crate::rope::{Rotary, apply_rotary_signed, signed_sin};
use crate::small_gemm;
use crate::weights::WeightStore;

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// A trainable addition to a frozen [`Linear`] layer (LoRA implements it). It receives the layer's
/// input and the frozen layer's output and returns the adapted output.
pub trait LinearAdapter: Send + std::fmt::Debug {
    /// `base` is `x W^T + b`; return the adapted output (e.g. `base + scale · x A^T B^T`).
    fn forward(&self, x: &Tensor, base: Tensor) -> Result<Tensor>;
}

/// A linear layer `y = x W^T + b`, through which every projection of the model runs, so an
/// adapter can be attached to any of them.
#[derive(Debug)]
pub struct Linear {
    /// The module path in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub(crate) name: String,
    /// `[out_features, in_features]`.
    pub(crate) weight: Tensor,
    /// `[out_features]`, when the layer has a bias.
    pub(crate) bias: Option<Tensor>,
    /// An optional adapter applied after the frozen projection.
    pub(crate) adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// Applies the layer (and its adapter, if any) to `x` of shape `[…, in_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.project(x).op_with(|| self.name.clone())?;
        match &self.adapter {
            Some(a) => a.forward(x, y),
            None => Ok(y),
        }
    }

    /// The module path in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The frozen `[out_features, in_features]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The `[out_features]` bias, when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether an adapter is attached.
    pub fn has_adapter(&self) -> bool {
        self.adapter.is_some()
    }

    /// Attaches `adapter` (replacing any other) or, with `None`, detaches; returns the one that
    /// was attached. [`LoraAdapter`](crate::LoraAdapter) does this for every targeted layer.
    pub fn set_adapter(
        &mut self,
        adapter: Option<Box<dyn LinearAdapter>>,
    ) -> Option<Box<dyn LinearAdapter>> {
        std::mem::replace(&mut self.adapter, adapter)
    }

    /// `x W^T + b` without the adapter.
    fn project(&self, x: &Tensor) -> TchResult<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `x W^T + b` for `x` `[…, in]` and `weight` `[out, in]`.
fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> TchResult<Tensor> {
    let size = x.size();
    let &[out, inp] = weight.size().as_slice() else {
        return x.f_linear(weight, bias);
    };
    let rows = size.iter().rev().skip(1).product::<i64>();
    if rows <= small_gemm::MAX_ROWS
        && let Some(y) = small_gemm::linear(x, weight, bias)
    {
        return y;
    }
    if x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && SMALL_BATCH_ROWS.contains(&rows)
        && size.last() == Some(&inp)
    {
        // MKL's x·Wᵀ kernel for a dozen to a few dozen rows (batched decoding, GRPO rollouts)
        // reads the weights at half the speed of its W·xᵀ, which treats the long output
        // dimension as the rows: measured 1.2-1.3x less time for 12-40 rows.
        let y = weight
            .f_matmul(&x.f_reshape([rows, inp])?.f_tr()?)?
            .f_tr()?;
        let y = match bias {
            Some(b) => y.f_add(b)?,
            None => y,
        };
        let mut shape = size;
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        return y.f_reshape(shape.as_slice());
    }
    x.f_linear(weight, bias)
}

/// Row counts for which [`Linear`] multiplies as `W·xᵀ` on the CPU (see `linear`).
const SMALL_BATCH_ROWS: std::ops::RangeInclusive<i64> = 12..=40;

/// Root-mean-square layer norm, computed in f32 and cast back, as transformers does (f64 inputs
/// stay in f64).
#[derive(Debug)]
pub struct RmsNorm {
    /// `[dim]` scale.
    pub(crate) weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Normalizes the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> TchResult<Tensor> {
        let kind = x.kind();
        if matches!(kind, Kind::Float | Kind::Double) && self.weight.kind() == kind {
            // libtorch's rms_norm computes the same `x · rsqrt(mean(x²) + eps) · weight` in one
            // call instead of seven (decoding is dominated by per-op overhead).
            let d = x.size().last().copied().unwrap_or(0);
            return x.f_rms_norm([d].as_slice(), Some(&self.weight), self.eps);
        }
        // f32 as transformers (half kinds are cast back before the scale, as transformers does),
        // except that f64 stays f64 (gradient checks need the precision).
        let xf = if kind == Kind::Double {
            x.shallow_clone()
        } else {
            x.f_to_kind(Kind::Float)?
        };
        let var =
            xf.f_pow_tensor_scalar(2)?
                .f_mean_dim(Some([-1i64].as_slice()), true, None::<Kind>)?;
        let normed = xf
            .f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?
            .f_to_kind(kind)?;
        self.weight.f_mul(&normed)
    }
}

/// How attention is masked in one forward, shared by every layer.
#[derive(Debug)]
struct AttnPlan {
    /// `[B, 1, Tq, Tk]` bool (true = attend), or none.
    mask: Option<Tensor>,
    /// Use SDPA's built-in causal mask (no padding, no cache offset).
    is_causal: bool,
    /// `[B, 1, T, D]`.
    cos: Tensor,
    /// `[B, 1, T, D]`, see [`signed_sin`].
    signed_sin: Tensor,
}

/// Multi-head attention with grouped key/value heads, RoPE, and Qwen3's per-head q/k norms.
#[derive(Debug)]
pub struct Attention {
    /// Query projection.
    pub(crate) q_proj: Linear,
    /// Key projection.
    pub(crate) k_proj: Linear,
    /// Value projection.
    pub(crate) v_proj: Linear,
    /// Output projection.
    pub(crate) o_proj: Linear,
    /// Qwen3's RMSNorm over each query head.
    pub(crate) q_norm: Option<RmsNorm>,
    /// Qwen3's RMSNorm over each key head.
    pub(crate) k_norm: Option<RmsNorm>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        plan: &AttnPlan,
        kv: Option<(&mut LayerKv, i64)>,
    ) -> Result<Tensor> {
        let (b, t) = match x.size().as_slice() {
            [b, t, _] => (*b, *t),
            s => {
                return Err(Error::input(format!(
                    "attention input must be [B, T, hidden], got {s:?}"
                )));
            }
        };
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let name = &self.o_proj.name;
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| -> TchResult<Tensor> {
            let y = y.f_view([b, t, n, d])?;
            let y = match norm {
                Some(nm) => nm.forward(&y)?,
                None => y,
            };
            y.f_transpose(1, 2)
        };
        let q = heads(q, h, &self.q_norm).op_with(|| format!("{name}: query heads"))?;
        let k = heads(k, kvh, &self.k_norm).op_with(|| format!("{name}: key heads"))?;
        let v = heads(v, kvh, &None).op_with(|| format!("{name}: value heads"))?;
        let q = apply_rotary_signed(&q, &plan.cos, &plan.signed_sin)?;
        let k = apply_rotary_signed(&k, &plan.cos, &plan.signed_sin)?;
        let (k, v) = match kv {
            None => (k, v),
            Some((cache, len)) => {
                let f = || -> TchResult<(Tensor, Tensor)> {
                    cache.k.f_narrow(2, len, t)?.f_copy_(&k)?;
                    cache.v.f_narrow(2, len, t)?.f_copy_(&v)?;
                    Ok((
                        cache.k.f_narrow(2, 0, len + t)?,
                        cache.v.f_narrow(2, 0, len + t)?,
                    ))
                };
                f().op_with(|| format!("{name}: KV cache write"))?
            }
        };
        let scale = 1.0 / (d as f64).sqrt();
        let n_rep = h / kvh;
        let f = || -> TchResult<Tensor> {
            let out = if t == 1 && n_rep > 1 {
                // One query per row: fold the query heads that share a key head into that head's
                // query axis, so attention runs on the key/value heads without repeating them.
                let qg = q.f_reshape([b, kvh, n_rep, d])?;
                Tensor::f_scaled_dot_product_attention(
                    &qg,
                    &k,
                    &v,
                    plan.mask.as_ref(),
                    0.0,
                    false,
                    scale,
                    false,
                )?
                .f_reshape([b, h, 1, d])?
            } else {
                Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    plan.mask.as_ref(),
                    0.0,
                    plan.is_causal,
                    scale,
                    n_rep > 1,
                )?
            };
            out.f_transpose(1, 2)?.f_reshape([b, t, h * d])
        };
        let out = f().op_with(|| format!("{name}: attention"))?;
        self.o_proj.forward(&out)
    }
}

/// The gated SiLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection.
    pub(crate) gate_proj: Linear,
    /// Up projection.
    pub(crate) up_proj: Linear,
    /// Down projection.
    pub(crate) down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        let a = g
            .f_silu()
            .and_then(|g| g.f_mul(&u))
            .op_with(|| format!("{}: activation", self.gate_proj.name))?;
        self.down_proj.forward(&a)
    }
}

/// One pre-norm decoder block.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub(crate) input_layernorm: RmsNorm,
    /// Self-attention.
    pub(crate) self_attn: Attention,
    /// Norm before the MLP.
    pub(crate) post_attention_layernorm: RmsNorm,
    /// The MLP.
    pub(crate) mlp: Mlp,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        plan: &AttnPlan,
        kv: Option<(&mut LayerKv, i64)>,
    ) -> Result<Tensor> {
        let name = &self.self_attn.o_proj.name;
        let h = self
            .input_layernorm
            .forward(x)
            .op_with(|| format!("{name}: input norm"))?;
        let h = self.self_attn.forward(&h, plan, kv)?;
        let x = x.f_add(&h).op_with(|| format!("{name}: residual"))?;
        let h = self
            .post_attention_layernorm
            .forward(&x)
            .op_with(|| format!("{name}: post-attention norm"))?;
        let h = self.mlp.forward(&h)?;
        x.f_add(&h).op_with(|| format!("{name}: residual"))
    }
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Compute kind the weights are cast to: `Float`, `BFloat16` or `Half`.
    pub kind: Kind,
    /// Device the weights are placed on.
    pub device: Device,
}

impl Default for LoadOptions {
    /// f32 on the CPU.
    fn default() -> Self {
        LoadOptions {
            kind: Kind::Float,
            device: Device::Cpu,
        }
    }
}

/// A decoder-only causal language model (Qwen2, Qwen3 or Llama) with its weights.
///
/// `forward` returns full-sequence logits; `token_logprobs` the log-probs of each next token,
/// differentiable when the weights require grad. Both accept padded batches: the attention mask
/// hides padding keys and RoPE positions are counted from the mask, so a row's results do not
/// depend on its padding or its batch.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    kind: Kind,
    device: Device,
    eos_token_ids: Vec<u32>,
    /// `[vocab, hidden]` token embeddings (`model.embed_tokens.weight`).
    pub(crate) embed_tokens: Tensor,
    /// The decoder blocks.
    pub(crate) layers: Vec<DecoderLayer>,
    /// Final norm (`model.norm`).
    pub(crate) norm: RmsNorm,
    /// Output projection; `None` when tied to `embed_tokens`.
    pub(crate) lm_head: Option<Linear>,
    rotary: Rotary,
}

/// Where a model's tensors come from while it is built: a checkpoint, or a random initializer.
/// `take` is asked for each tensor the config implies, with its exact shape.
trait TensorSource {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor>;
}

/// Takes checkpoint tensors by name, checking each shape against the config, and remembers what
/// was taken so leftovers can be reported.
struct StoreSource<'a> {
    store: &'a WeightStore,
    taken: std::collections::BTreeSet<String>,
    opts: LoadOptions,
    dir: &'a Path,
}

impl TensorSource for StoreSource<'_> {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let Some((path, info)) = self.store.info(name) else {
            return Err(Error::weight(
                self.dir,
                name,
                format!("missing from the checkpoint (expected shape {shape:?})"),
            ));
        };
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(Error::weight(
                path,
                name,
                format!("shape {found:?} in the checkpoint, but config.json implies {shape:?}"),
            ));
        }
        self.taken.insert(name.to_string());
        self.store.load(name, self.opts.kind, self.opts.device)
    }
}

/// transformers' `_init_weights` for these decoders: linear and embedding weights
/// `N(0, initializer_range²)`, biases 0, norm scales 1, drawn from a seeded ChaCha stream per
/// tensor (keyed by its position), so a seed gives the same model on any device.
struct RandomSource {
    seed: u64,
    std: f64,
    opts: LoadOptions,
    count: u64,
}

impl TensorSource for RandomSource {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        use rand_chacha::ChaCha8Rng;
        use rand_core::{RngCore, SeedableRng};
        let n: i64 = shape.iter().product();
        let (kind, dev) = (self.opts.kind, self.opts.device);
        self.count += 1;
        let t = if name.ends_with("norm.weight") {
            Tensor::f_ones(shape, (kind, dev))
        } else if name.ends_with(".bias") {
            Tensor::f_zeros(shape, (kind, dev))
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(self.count);
            let mut uniform =
                || ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            let mut vals = Vec::with_capacity(n as usize);
            while vals.len() < n as usize {
                // Box-Muller: two normals from two uniforms in (0, 1).
                let (u1, u2) = (uniform(), uniform());
                let r = (-2.0 * u1.ln()).sqrt() * self.std;
                let th = 2.0 * std::f64::consts::PI * u2;
                vals.push((r * th.cos()) as f32);
                vals.push((r * th.sin()) as f32);
            }
            vals.truncate(n as usize);
            Tensor::f_from_slice(&vals)
                .and_then(|t| t.f_view(shape)?.f_to_kind(kind)?.f_to_device(dev))
        };
        t.op_with(|| format!("initializing `{name}`"))
    }
}

struct Loader<'a> {
    src: &'a mut dyn TensorSource,
}

impl Loader<'_> {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.src.take(name, shape)
    }

    fn linear(&mut self, name: &str, out: i64, inp: i64, bias: bool) -> Result<Linear> {
        let weight = self.take(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(self.take(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear {
            name: name.to_string(),
            weight,
            bias,
            adapter: None,
        })
    }

    fn norm(&mut self, name: &str, dim: i64, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.take(&format!("{name}.weight"), &[dim])?,
            eps,
        })
    }
}

impl CausalLm {
    /// Loads a Hugging Face model folder strictly: every tensor the config implies must be present
    /// with its exact shape, and no other tensor may be (except a tied `lm_head.weight` and old
    /// `rotary_emb.inv_freq` buffers, which transformers ignores too).
    pub fn load(dir: impl AsRef<Path>, opts: LoadOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir.as_ref())?;
        Self::from_folder(&folder, opts)
    }

    /// Loads from an already opened folder (see [`CausalLm::load`]).
    pub fn from_folder(folder: &ModelFolder, opts: LoadOptions) -> Result<Self> {
        let store = WeightStore::open(folder)?;
        let mut model = Self::from_store(&folder.config, &store, opts, &folder.dir)?;
        model.eos_token_ids = folder.eos_token_ids();
        Ok(model)
    }

    /// Builds the model from a config and a weight store; `dir` only names the folder in errors.
    pub fn from_store(
        config: &ModelConfig,
        store: &WeightStore,
        opts: LoadOptions,
        dir: &Path,
    ) -> Result<Self> {
        let mut src = StoreSource {
            store,
            taken: Default::default(),
            opts,
            dir,
        };
        let model = Self::build(config, opts, dir, &mut src)?;
        let c = config;
        let leftover: Vec<&str> = store
            .names()
            .filter(|n| !src.taken.contains(*n))
            .filter(|n| !(c.tie_word_embeddings && *n == "lm_head.weight"))
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if let Some(first) = leftover.first() {
            let path = store
                .info(first)
                .map(|(p, _)| p.to_path_buf())
                .unwrap_or_else(|| dir.to_path_buf());
            let more = if leftover.len() > 1 {
                format!(" (and {} more)", leftover.len() - 1)
            } else {
                String::new()
            };
            return Err(Error::weight(
                path,
                *first,
                format!(
                    "unexpected: config.json ({} layers, model_type {}) has no such weight{more}",
                    c.num_hidden_layers,
                    c.architecture.model_type()
                ),
            ));
        }
        Ok(model)
    }

    /// A randomly initialized model of `config`, as transformers initializes one
    /// (`initializer_range` 0.02 unless `std` says otherwise), from a seeded Rust-side stream.
    pub fn random(
        config: &ModelConfig,
        seed: u64,
        std: Option<f64>,
        opts: LoadOptions,
    ) -> Result<Self> {
        let mut src = RandomSource {
            seed,
            std: std.unwrap_or(0.02),
            opts,
            count: 0,
        };
        Self::build(config, opts, Path::new("(random init)"), &mut src)
    }

    fn build(
        config: &ModelConfig,
        opts: LoadOptions,
        dir: &Path,
        src: &mut dyn TensorSource,
    ) -> Result<Self> {
        if !matches!(
            opts.kind,
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(Error::input(format!(
                "compute kind {:?} is not a floating-point kind",
                opts.kind
            )));
        }
        if config.hidden_act != "silu" {
            return Err(Error::Folder(optimsyn_data_io::Error::Invalid {
                path: dir.join("config.json"),
                message: format!(
                    "field `hidden_act`: `{}` is not supported (only silu)",
                    config.hidden_act
                ),
            }));
        }
        let c = config;
        let (hid, inter, vocab) = (
            c.hidden_size as i64,
            c.intermediate_size as i64,
            c.vocab_size as i64,
        );
        let (h, kvh, d) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim as i64,
        );
        let eps = c.rms_norm_eps;
        let mut ld = Loader { src };
        let embed_tokens = ld.take("model.embed_tokens.weight", &[vocab, hid])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qk_norm = c.architecture == Architecture::Qwen3;
            let self_attn = Attention {
                q_proj: ld.linear(&format!("{p}.self_attn.q_proj"), h * d, hid, c.qkv_bias)?,
                k_proj: ld.linear(&format!("{p}.self_attn.k_proj"), kvh * d, hid, c.qkv_bias)?,
                v_proj: ld.linear(&format!("{p}.self_attn.v_proj"), kvh * d, hid, c.qkv_bias)?,
                o_proj: ld.linear(&format!("{p}.self_attn.o_proj"), hid, h * d, c.o_bias)?,
                q_norm: if qk_norm {
                    Some(ld.norm(&format!("{p}.self_attn.q_norm"), d, eps)?)
                } else {
                    None
                },
                k_norm: if qk_norm {
                    Some(ld.norm(&format!("{p}.self_attn.k_norm"), d, eps)?)
                } else {
                    None
                },
                heads: h,
                kv_heads: kvh,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: ld.linear(&format!("{p}.mlp.gate_proj"), inter, hid, c.mlp_bias)?,
                up_proj: ld.linear(&format!("{p}.mlp.up_proj"), inter, hid, c.mlp_bias)?,
                down_proj: ld.linear(&format!("{p}.mlp.down_proj"), hid, inter, c.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                input_layernorm: ld.norm(&format!("{p}.input_layernorm"), hid, eps)?,
                self_attn,
                post_attention_layernorm: ld.norm(
                    &format!("{p}.post_attention_layernorm"),
                    hid,
                    eps,
                )?,
                mlp,
            });
        }
        let norm = ld.norm("model.norm", hid, eps)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(ld.linear("lm_head", vocab, hid, false)?)
        };
        Ok(CausalLm {
            config: config.clone(),
            kind: opts.kind,
            device: opts.device,
            eos_token_ids: config.eos_token_ids.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config, opts.device)?,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Compute kind of the weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The `[vocab, hidden]` token embeddings (`model.embed_tokens.weight`; also the output
    /// projection when the checkpoint ties them).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Stop ids from `config.json` and `generation_config.json` (add the tokenizer's when you have it).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Every weight tensor with its checkpoint name (a tied output projection is listed once, as
    /// `model.embed_tokens.weight`).
    pub fn named_parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        fn lin<'a>(out: &mut Vec<(String, &'a Tensor)>, l: &'a Linear) {
            out.push((format!("{}.weight", l.name), &l.weight));
            if let Some(b) = &l.bias {
                out.push((format!("{}.bias", l.name), b));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm.weight,
            ));
            let a = &layer.self_attn;
            for l in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                lin(&mut out, l);
            }
            if let Some(n) = &a.q_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), &n.weight));
            }
            if let Some(n) = &a.k_norm {
                out.push((format!("{p}.self_attn.k_norm.weight"), &n.weight));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm.weight,
            ));
            for l in [
                &layer.mlp.gate_proj,
                &layer.mlp.up_proj,
                &layer.mlp.down_proj,
            ] {
                lin(&mut out, l);
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm.weight));
        if let Some(l) = &self.lm_head {
            lin(&mut out, l);
        }
        out
    }

    /// Every linear layer of the decoder blocks (attention and MLP projections), in checkpoint
    /// order, for attaching adapters. Each carries its module path in [`Linear::name`].
    pub fn linear_layers_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            let m = &mut layer.mlp;
            out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        out
    }

    /// A fresh, empty KV cache for `batch` rows with room for `capacity` tokens per row (it grows
    /// when a forward needs more).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        KvCache::new(
            c.num_hidden_layers,
            batch as i64,
            capacity as i64,
            c.num_key_value_heads as i64,
            c.head_dim as i64,
            self.kind,
            self.device,
        )
    }

    /// Checks `[B, T]` integer ids (within the vocabulary) and an optional `[B, T]` mask; returns
    /// the ids as i64 on the model's device and the mask as bool, if one was given.
    fn check_inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let size = input_ids.size();
        let [b, t] = size.as_slice() else {
            return Err(Error::input(format!(
                "input ids must be [batch, seq], got shape {size:?}"
            )));
        };
        if *b == 0 || *t == 0 {
            return Err(Error::input(format!(
                "empty input: ids have shape {size:?}"
            )));
        }
        if !matches!(
            input_ids.kind(),
            Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8
        ) {
            return Err(Error::input(format!(
                "input ids must be integers, got {:?}",
                input_ids.kind()
            )));
        }
        let ids = input_ids
            .f_to_device(self.device)
            .and_then(|t| t.f_to_kind(Kind::Int64))
            .op("input ids")?;
        let lo = ids.f_min().op("input ids")?.int64_value(&[]);
        let hi = ids.f_max().op("input ids")?.int64_value(&[]);
        let vocab = self.config.vocab_size as i64;
        if lo < 0 || hi >= vocab {
            let bad = if lo < 0 { lo } else { hi };
            return Err(Error::input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let mask = match attention_mask {
            None => None,
            Some(m) => {
                if m.size() != size {
                    return Err(Error::input(format!(
                        "attention mask has shape {:?}, input ids {size:?}",
                        m.size()
                    )));
                }
                Some(
                    m.f_to_device(self.device)
                        .and_then(|m| m.f_ne(0))
                        .op("attention mask")?,
                )
            }
        };
        Ok((ids, mask))
    }

    fn check_context(&self, total: i64) -> Result<()> {
        let max = self.config.max_position_embeddings as i64;
        if total > max {
            return Err(Error::input(format!(
                "sequence of {total} tokens is longer than the model's context ({max} tokens, max_position_embeddings)"
            )));
        }
        Ok(())
    }

    /// Final-normed hidden states `[B, T, hidden]` of a (padded) batch. `attention_mask` is `[B, T]`
    /// (nonzero = real token); without one every token is real. With a cache, the ids are appended
    /// after what the cache holds (the mask then covers only the new ids) and the cache is updated.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (ids, mask) = self.check_inputs(input_ids, attention_mask)?;
        // An all-ones mask is no mask: SDPA can then use its causal kernel.
        let mask = match mask {
            Some(m) if m.f_all().op("attention mask")?.int64_value(&[]) == 0 => Some(m),
            _ => None,
        };
        self.hidden_states(&ids, mask.as_ref(), cache, true)
    }

    /// One decode step of [`CausalLm::generate`]: `ids` `[B, 1]` i64 on the device (tokens the
    /// model chose itself, so inside the vocabulary) and `mask` `[B, 1]` bool with at least one
    /// `false` (finished rows), or none. The caller keeps every row inside the context, so this
    /// step reads nothing back from the device: on a GPU the host queues the next kernels while
    /// the previous ones run.
    pub(crate) fn decode_hidden(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.hidden_states(ids, mask, Some(cache), false)
    }

    /// The layers over checked inputs; `check_context` reads the longest row's position back to
    /// refuse one past the context.
    fn hidden_states(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        check_context: bool,
    ) -> Result<Tensor> {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let mut cache = cache;
        let (positions, attn_mask, is_causal) = match cache.as_deref_mut() {
            None => self.positions_uncached(mask, b, t)?,
            Some(cache) => self.positions_cached(cache, mask, b, t, check_context)?,
        };
        let (cos, sin) = self.rotary.cos_sin(&positions, self.kind)?;
        // Broadcast over heads once per forward, not in every layer.
        let plan = AttnPlan {
            mask: attn_mask,
            is_causal,
            cos: cos.f_unsqueeze(1).op("RoPE")?,
            signed_sin: signed_sin(&sin)?.f_unsqueeze(1).op("RoPE")?,
        };
        let mut x = Tensor::f_embedding(&self.embed_tokens, ids, -1, false, false)
            .op("model.embed_tokens")?;
        match cache {
            None => {
                for layer in &self.layers {
                    x = layer.forward(&x, &plan, None)?;
                }
            }
            Some(cache) => {
                // After an error part-way, the cache is inconsistent: drop it.
                let len = cache.len;
                for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    x = layer.forward(&x, &plan, Some((kv, len)))?;
                }
                cache.len += t;
            }
        }
        self.norm.forward(&x).op("model.norm")
    }

    /// Positions and attention of a forward without a KV cache: `(positions [B, T], mask, is_causal)`.
    fn positions_uncached(&self, mask: Option<&Tensor>, b: i64, t: i64) -> Result<AttnInputs> {
        let dev = self.device;
        let Some(m) = mask else {
            self.check_context(t)?;
            let pos = Tensor::f_arange(t, (Kind::Int64, dev))
                .and_then(|p| p.f_unsqueeze(0)?.f_expand([b, t], false))
                .op("positions")?;
            return Ok((pos, None, t > 1));
        };
        self.check_context(
            m.f_sum_dim_intlist(Some([1i64].as_slice()), false, Kind::Int64)
                .and_then(|n| n.f_max())
                .op("attention mask")?
                .int64_value(&[]),
        )?;
        let pos = positions_from_mask(m, None).op("positions")?;
        let attn = causal_mask(0, t, t, b, Some(m), dev).op("attention mask")?;
        Ok((pos, Some(attn), false))
    }

    /// Positions and attention of a forward that appends `t` tokens to `cache` (whose mask,
    /// positions and length it advances).
    fn positions_cached(
        &self,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
        b: i64,
        t: i64,
        check_context: bool,
    ) -> Result<AttnInputs> {
        let dev = self.device;
        if cache.batch != b {
            return Err(Error::input(format!(
                "the KV cache holds {} rows, the input {b}",
                cache.batch
            )));
        }
        let new_mask = match mask {
            Some(m) => m.shallow_clone(),
            None => Tensor::f_ones([b, t], (Kind::Bool, dev)).op("attention mask")?,
        };
        // Each row's positions must stay inside the context (slots may exceed it when rows are
        // padded or finished).
        let next_pos = cache
            .next_pos
            .f_add(
                &new_mask
                    .f_sum_dim_intlist(Some([1i64].as_slice()), false, Kind::Int64)
                    .op("positions")?,
            )
            .op("positions")?;
        if check_context {
            self.check_context(next_pos.f_max().op("positions")?.int64_value(&[]))?;
        }
        cache.reserve(t)?;
        let len = cache.len;
        let pos = positions_from_mask(&new_mask, Some(&cache.next_pos)).op("positions")?;
        cache
            .valid
            .f_narrow(1, len, t)
            .and_then(|mut v| v.f_copy_(&new_mask))
            .op("KV cache mask")?;
        cache.next_pos = next_pos;
        cache.all_valid &= mask.is_none();
        let total = len + t;
        let (attn, is_causal) = if cache.all_valid {
            if len == 0 && t > 1 {
                (None, true)
            } else if t == 1 {
                (None, false)
            } else {
                let m = causal_mask(len, t, total, b, None, dev).op("attention mask")?;
                (Some(m), false)
            }
        } else {
            let valid = cache.valid.f_narrow(1, 0, total).op("attention mask")?;
            let m = causal_mask(len, t, total, b, Some(&valid), dev).op("attention mask")?;
            (Some(m), false)
        };
        Ok((pos, attn, is_causal))
    }

    /// Logits `[…, vocab]` from final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(l) => l.forward(hidden),
            None => linear(hidden, &self.embed_tokens, None).op("lm_head (tied)"),
        }
    }

    /// Full-sequence logits `[B, T, vocab]` (see [`CausalLm::forward_hidden`] for the arguments).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, cache)?;
        self.logits(&h)
    }

    /// `[B, T-1]` log-probs of each next token: entry `(b, i)` is `log p(ids[b, i+1] | ids[b, ..=i])`
    /// under `log_softmax(logits / temperature)` (temperature 0 or 1: plain `log_softmax`), in f32.
    /// Entries whose target is padding (mask 0) are 0. Differentiable when weights require grad.
    pub fn token_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        temperature: f64,
    ) -> Result<Tensor> {
        let t = input_ids.size().get(1).copied().unwrap_or(0);
        if t < 2 {
            return Err(Error::input(format!(
                "log-probs need at least 2 tokens per row, got shape {:?}",
                input_ids.size()
            )));
        }
        let h = self.forward_hidden(input_ids, attention_mask, None)?;
        let h = h.f_narrow(1, 0, t - 1).op("token_logprobs")?;
        let logits = self.logits(&h)?;
        let targets = input_ids
            .f_narrow(1, 1, t - 1)
            .and_then(|x| x.f_to_device(self.device)?.f_to_kind(Kind::Int64))
            .op("token_logprobs")?;
        let lp = logprobs_of(&logits, &targets, temperature)?;
        match attention_mask {
            None => Ok(lp),
            Some(m) => {
                let keep = m
                    .f_narrow(1, 1, t - 1)
                    .and_then(|m| m.f_to_device(self.device)?.f_ne(0))
                    .op("token_logprobs")?;
                lp.f_masked_fill(&keep.f_logical_not().op("token_logprobs")?, 0.0)
                    .op("token_logprobs")
            }
        }
    }
}

/// RoPE positions `[B, T]` from a `[B, T]` bool mask: each real token's index among the real tokens
/// of its row (after `offset[b]` earlier ones); padding gets the position of the token before it
/// (or 0), which is never attended to.
fn positions_from_mask(mask: &Tensor, offset: Option<&Tensor>) -> TchResult<Tensor> {
    let pos = mask.f_cumsum(1, Kind::Int64)?.f_sub_scalar(1)?;
    let pos = match offset {
        Some(o) => pos.f_add(&o.f_unsqueeze(1)?)?,
        None => pos,
    };
    pos.f_clamp_min(0)
}

/// `log_softmax(logits / temperature)` gathered at `targets` (same shape as `logits` without its
/// last dimension), in f32. This is the one log-prob function of the crate: generation, scoring and
/// training all go through it, so a sampled token's log-prob equals the one recomputed later.
pub fn logprobs_of(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let lp = log_softmax_at(logits, temperature)?;
    lp.f_gather(-1, &targets.f_unsqueeze(-1).op("log-probs")?, false)
        .and_then(|t| t.f_squeeze_dim(-1))
        .op("log-probs")
}

/// `log_softmax(logits / temperature)` over the last dimension, in f32 (temperature 0 or 1: no
/// scaling). Generation samples from exactly these values.
pub fn log_softmax_at(logits: &Tensor, temperature: f64) -> Result<Tensor> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::input(format!(
            "temperature must be finite and ≥ 0, got {temperature}"
        )));
    }
    let f = || -> TchResult<Tensor> {
        // f32 (f64 logits stay f64, so gradient checks keep their precision).
        let l = if logits.kind() == Kind::Double {
            logits.shallow_clone()
        } else {
            logits.f_to_kind(Kind::Float)?
        };
        let l = if temperature > 0.0 && temperature != 1.0 {
            l.f_div_scalar(temperature)?
        } else {
            l
        };
        l.f_log_softmax(-1, None::<Kind>)
    };
    f().op("log-softmax")
}

/// `(positions [B, T], attention mask, is_causal)` of one forward.
type AttnInputs = (Tensor, Option<Tensor>, bool);

/// The boolean attention mask of `t` queries at positions `len..len + t` over `total` keys:
/// causal, and with `valid` (`[B, total]`) padding keys hidden (a query always sees itself, so no
/// row is fully masked). `[1, 1, T, total]` without `valid`, `[B, 1, T, total]` with it.
fn causal_mask(
    len: i64,
    t: i64,
    total: i64,
    b: i64,
    valid: Option<&Tensor>,
    dev: Device,
) -> TchResult<Tensor> {
    let q = Tensor::f_arange_start(len, len + t, (Kind::Int64, dev))?.f_unsqueeze(1)?;
    let k = Tensor::f_arange(total, (Kind::Int64, dev))?.f_unsqueeze(0)?;
    let allowed = k.f_le_tensor(&q)?; // [T, total]
    match valid {
        Some(v) => allowed
            .f_logical_and(&v.f_view([b, 1, 1, total])?)?
            .f_logical_or(&k.f_eq_tensor(&q)?),
        None => allowed.f_view([1, 1, t, total]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_batch_linear_equals_the_plain_one() {
        tch::manual_seed(3);
        let w = Tensor::randn([48, 20], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([48], (Kind::Float, Device::Cpu));
        // Row counts below, inside and above SMALL_BATCH_ROWS, as 2-D and 3-D inputs.
        for shape in [
            vec![1, 20],
            vec![11, 20],
            vec![12, 20],
            vec![4, 4, 20],
            vec![40, 1, 20],
            vec![41, 20],
        ] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            for bias in [None, Some(&b)] {
                let want = x.linear(&w, bias);
                let got = linear(&x, &w, bias).unwrap();
                assert_eq!(got.size(), want.size(), "{shape:?}");
                let err = (&got - &want).abs().max().double_value(&[]);
                assert!(err < 1e-5, "{shape:?}: {err}");
            }
        }
    }
}
