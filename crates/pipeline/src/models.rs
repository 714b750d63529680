//! What the loop keeps loaded: the policy's tokenizer and prompt, the generator, the evaluation
//! sets' hygiene index; and the policy itself.

use std::path::PathBuf;

use optimsyn_data_io::ChatTokenizer;
use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, LoraConfig};
use optimsyn_rl_grpo::Prompt;
use optimsyn_rubric_policy::{PolicyPrompt, RubricPolicy};
use optimsyn_synth::{GenerationParams, Generator, LocalGenerator, QaPrompt};

use crate::config::{Role, RunConfig};
use crate::error::{Error, Result};
use crate::hygiene::Hygiene;
use crate::stage0::SeedPrompt;

/// Everything the loop keeps loaded.
pub struct Models {
    /// The policy's tokenizer.
    pub policy_tok: ChatTokenizer,
    /// The generator.
    pub generator: Box<dyn Generator>,
    /// The policy prompt.
    pub policy_prompt: PolicyPrompt,
    /// The generator prompt's template files (`None`: built in).
    pub qa_templates: (Option<PathBuf>, Option<PathBuf>),
    /// The evaluation sets written data is checked against.
    pub hygiene: Hygiene,
}

impl Models {
    /// The generator prompt.
    pub fn qa_prompt(&self) -> Result<QaPrompt> {
        Ok(QaPrompt::from_files(
            self.qa_templates.0.as_deref(),
            self.qa_templates.1.as_deref(),
        )?)
    }
}

/// f32 on `role`'s device.
pub(crate) fn opts(cfg: &RunConfig, role: Role) -> Result<LoadOptions> {
    crate::device::load_options(cfg.models.device_of(role), crate::device::Dtype::F32)
}

/// Loads tokenizers, the generator and the templates.
pub fn load_models(cfg: &RunConfig) -> Result<Models> {
    let params = GenerationParams {
        max_new_tokens: cfg.generator.max_new_tokens,
        temperature: cfg.generator.temperature,
        seed: cfg.seed,
        ..Default::default()
    };
    let generator: Box<dyn Generator> = match (&cfg.models.generator, &cfg.models.generator_url) {
        (Some(dir), _) => Box::new(LocalGenerator::load(
            dir,
            opts(cfg, Role::Generator)?,
            params,
        )?),
        (None, Some(url)) => {
            let c = optimsyn_synth::OpenAiConfig {
                base_url: url.clone(),
                model: cfg.models.generator_model.clone().unwrap_or_default(),
                ..Default::default()
            };
            Box::new(optimsyn_synth::OpenAiGenerator::new(c, params)?)
        }
        (None, None) => {
            return Err(Error::Config(
                "no generator configured: set `models.generator` or `models.generator_url`".into(),
            ));
        }
    };
    Ok(Models {
        policy_tok: ChatTokenizer::from_model_dir(&cfg.models.policy)?,
        generator,
        policy_prompt: PolicyPrompt::from_files(
            cfg.prompts.policy_system.as_deref(),
            cfg.prompts.policy_user.as_deref(),
        )?,
        qa_templates: (cfg.prompts.qa_system.clone(), cfg.prompts.qa_user.clone()),
        hygiene: Hygiene::load(cfg)?,
    })
}

/// The policy prompts of `seeds`, tokenized.
pub fn encode_prompts(cfg: &RunConfig, m: &Models, seeds: &[&SeedPrompt]) -> Result<Vec<Prompt>> {
    seeds
        .iter()
        .map(|s| {
            let domain = s.doc.domain.as_deref().unwrap_or(&cfg.data.domain);
            let ids = m.policy_prompt.encode(
                &m.policy_tok,
                domain,
                &s.doc.text,
                Some(cfg.policy.enable_thinking),
            )?;
            Ok(Prompt::new(s.doc.id.clone(), ids))
        })
        .collect()
}

/// A fresh policy: the base model with a seeded LoRA adapter (B = 0: it starts as the base).
pub fn load_policy(cfg: &RunConfig) -> Result<RubricPolicy> {
    let mut model = CausalLm::load(&cfg.models.policy, opts(cfg, Role::Policy)?)?;
    let lora = LoraConfig {
        r: cfg.policy.lora_r,
        alpha: cfg.policy.lora_alpha,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&mut model, lora, cfg.seed)?;
    let tok = ChatTokenizer::from_model_dir(&cfg.models.policy)?;
    let stop = optimsyn_synth::stop_tokens(&model, &tok);
    Ok(RubricPolicy::new(model, Some(adapter), stop))
}
