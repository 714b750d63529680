//! LoRA adapters served beside the base model, loaded and unloaded at run time through vLLM's
//! endpoints (`POST /v1/load_lora_adapter {"lora_name", "lora_path"}`,
//! `POST /v1/unload_lora_adapter {"lora_name"}`), so a trainer can publish each new policy and
//! sample from it here as it would from vLLM. A request names an adapter as its `model`.
//!
//! Only with [`ServeConfig::enable_lora`](crate::ServeConfig::enable_lora): the endpoints read
//! any folder the server can read, so they are off unless asked for (vLLM gates them behind
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
//!
//! The model thread owns the adapters. One is attached to the model at a time: a batch for
//! another one swaps it in (from its folder), a batch for the base model runs with the attached
//! one bypassed. Requests are grouped by adapter as they are by sampling settings, so switching
//! happens once per group, not per row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use optimsyn_lm::{CausalLm, LoraAdapter};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::Shared;
use crate::api::ApiError;
use crate::chat::request_body;
use crate::engine::Msg;

/// A change to the served adapters, carried out on the model thread.
pub(crate) enum AdapterOp {
    Load {
        name: String,
        path: PathBuf,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// The model thread's adapters: every loaded one's folder, and which one is attached.
#[derive(Default)]
pub(crate) struct Adapters {
    paths: BTreeMap<String, PathBuf>,
    attached: Option<(String, LoraAdapter)>,
}

impl Adapters {
    /// Carries out `op` and answers it.
    pub fn apply(&mut self, model: &mut CausalLm, op: AdapterOp) {
        match op {
            AdapterOp::Load { name, path, reply } => {
                let _ = reply.send(self.load(model, name, path));
            }
            AdapterOp::Unload { name, reply } => {
                let _ = reply.send(self.unload(model, &name));
            }
        }
    }

    fn load(&mut self, model: &mut CausalLm, name: String, path: PathBuf) -> Result<(), ApiError> {
        if self.paths.contains_key(&name) {
            return Err(already_loaded(&name));
        }
        if !path.join("adapter_config.json").is_file() {
            return Err(ApiError {
                kind: "NotFoundError",
                ..ApiError::status(
                    404,
                    format!(
                        "No adapter found for {}: it has no adapter_config.json",
                        path.display()
                    ),
                )
            });
        }
        // Loading it is the check that it fits this model (modules, ranks, shapes).
        self.attach(model, &name, &path).map_err(|m| ApiError {
            kind: "BadRequestError",
            ..ApiError::status(400, m)
        })?;
        self.paths.insert(name, path);
        Ok(())
    }

    fn unload(&mut self, model: &mut CausalLm, name: &str) -> Result<(), ApiError> {
        if self.paths.remove(name).is_none() {
            return Err(not_found(name));
        }
        if self.attached.as_ref().is_some_and(|(n, _)| n == name) {
            self.detach(model);
        }
        Ok(())
    }

    /// Makes `want` the attached adapter (`None`: leave whichever is attached; the caller
    /// bypasses it). An error is a message for every request of the batch.
    pub fn select(&mut self, model: &mut CausalLm, want: Option<&str>) -> Result<(), String> {
        let Some(name) = want else {
            return Ok(());
        };
        if self.attached.as_ref().is_some_and(|(n, _)| n == name) {
            return Ok(());
        }
        let path = self
            .paths
            .get(name)
            .cloned()
            .ok_or_else(|| format!("the LoRA adapter '{name}' was unloaded"))?;
        self.attach(model, name, &path)
    }

    /// The attached adapter, to bypass for the base model's rows.
    pub fn attached(&self) -> Option<&LoraAdapter> {
        self.attached.as_ref().map(|(_, a)| a)
    }

    fn attach(&mut self, model: &mut CausalLm, name: &str, path: &Path) -> Result<(), String> {
        self.detach(model);
        // A load that fails leaves the model as it was (optimsyn-lm sees to it).
        let a = LoraAdapter::load(model, path)
            .map_err(|e| format!("cannot load LoRA adapter '{name}': {e}"))?;
        self.attached = Some((name.to_string(), a));
        Ok(())
    }

    fn detach(&mut self, model: &mut CausalLm) {
        if let Some((_, a)) = self.attached.take() {
            a.detach(model);
        }
    }
}

fn already_loaded(name: &str) -> ApiError {
    ApiError {
        kind: "InvalidUserInput",
        ..ApiError::status(
            400,
            format!("The lora adapter '{name}' has already been loaded."),
        )
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError {
        kind: "NotFoundError",
        ..ApiError::status(404, format!("The lora adapter '{name}' cannot be found."))
    }
}

#[derive(Deserialize)]
struct LoadRequest {
    #[serde(default)]
    lora_name: String,
    #[serde(default)]
    lora_path: String,
}

#[derive(Deserialize)]
struct UnloadRequest {
    #[serde(default)]
    lora_name: String,
}

/// `POST /v1/load_lora_adapter`.
pub(crate) async fn load(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let run = async {
        enabled(&sh)?;
        let (body, _budget) = request_body(&sh, req).await?;
        let req: LoadRequest = parse(&body)?;
        if req.lora_name.is_empty() || req.lora_path.is_empty() {
            return Err(ApiError {
                kind: "InvalidUserInput",
                ..ApiError::status(400, "Both 'lora_name' and 'lora_path' must be provided.")
            });
        }
        if req.lora_name == sh.name || sh.adapter_names().contains(&req.lora_name) {
            return Err(already_loaded(&req.lora_name));
        }
        let (reply, rx) = oneshot::channel();
        let op = AdapterOp::Load {
            name: req.lora_name.clone(),
            path: PathBuf::from(&req.lora_path),
            reply,
        };
        let (name, path) = (req.lora_name.clone(), req.lora_path.clone());
        to_completion(&sh, move |sh| async move {
            send(&sh, op, rx).await?;
            sh.adapters_write().insert(name, path);
            Ok(())
        })
        .await?;
        tracing::info!(name = %req.lora_name, path = %req.lora_path, "loaded LoRA adapter");
        Ok(format!(
            "Success: LoRA adapter '{}' added successfully.",
            req.lora_name
        ))
    };
    text_reply(run.await)
}

/// `POST /v1/unload_lora_adapter`.
pub(crate) async fn unload(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let run = async {
        enabled(&sh)?;
        let (body, _budget) = request_body(&sh, req).await?;
        let req: UnloadRequest = parse(&body)?;
        if req.lora_name.is_empty() {
            return Err(ApiError {
                kind: "InvalidUserInput",
                ..ApiError::status(400, "'lora_name' must be provided.")
            });
        }
        if !sh.adapter_names().contains(&req.lora_name) {
            return Err(not_found(&req.lora_name));
        }
        let (reply, rx) = oneshot::channel();
        let op = AdapterOp::Unload {
            name: req.lora_name.clone(),
            reply,
        };
        let name = req.lora_name.clone();
        to_completion(&sh, move |sh| async move {
            // Taken out of the served names first: no new request gets queued for it.
            sh.adapters_write().remove(&name);
            send(&sh, op, rx).await
        })
        .await?;
        tracing::info!(name = %req.lora_name, "unloaded LoRA adapter");
        Ok(format!(
            "Success: LoRA adapter '{}' removed successfully.",
            req.lora_name
        ))
    };
    text_reply(run.await)
}

/// Runs a change of the served adapters to its end even if the client hangs up (hyper then drops
/// the handler), so the names requests may ask for and the model thread's adapters stay in step.
async fn to_completion<F, Fut>(sh: &Arc<Shared>, change: F) -> Result<(), ApiError>
where
    F: FnOnce(Arc<Shared>) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
{
    tokio::spawn(change(sh.clone()))
        .await
        .map_err(|e| ApiError::status(500, format!("internal error: {e}")))?
}

fn enabled(sh: &Shared) -> Result<(), ApiError> {
    if sh.config.enable_lora {
        Ok(())
    } else {
        Err(ApiError::status(
            404,
            "LoRA adapters are not enabled on this server (start it with enable_lora / --enable-lora)",
        ))
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))
}

async fn send(
    sh: &Shared,
    op: AdapterOp,
    rx: oneshot::Receiver<Result<(), ApiError>>,
) -> Result<(), ApiError> {
    let gone = || ApiError::status(503, "the server is shutting down");
    sh.jobs.send(Msg::Adapter(op)).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

/// vLLM answers these endpoints with plain text on success.
fn text_reply(r: Result<String, ApiError>) -> Response {
    match r {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}
