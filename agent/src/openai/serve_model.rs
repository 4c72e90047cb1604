//! `edgewise-agent serve-model`: one model file behind the OpenAI API, for tests, demos
//! (it plays the cloud there) and trying a model. Like llama.cpp's server it answers
//! whatever model name a request gives, under its own name.

use std::pin::Pin;
use std::sync::Arc;

use axum::http::HeaderMap;
use futures_util::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::{Answer, ApiError, Backend, Request};
use crate::runtime::Loaded;

/// Serves one loaded model.
pub struct ServeModel {
    /// The name responses and `/v1/models` carry.
    pub name: String,
    /// The model answering.
    pub model: Arc<Loaded>,
}

impl Backend for ServeModel {
    fn models(&self) -> Vec<serde_json::Value> {
        vec![serde_json::json!({"id": self.name, "owned_by": "edgewise"})]
    }

    fn answer(
        &self,
        request: Request,
        _headers: &HeaderMap,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, ApiError>> + Send + '_>> {
        Box::pin(async move {
            let rx = self.model.stream(request.prompt, request.sampling);
            Ok(Answer {
                model: self.name.clone(),
                pieces: ReceiverStream::new(rx).boxed(),
                edgewise: None,
                headers: Vec::new(),
                on_end: None,
                refine: None,
            })
        })
    }
}
