//! Getting instructions: signed webhook requests recorded in the timeline, the fallback URL
//! (asked once per communication), relative URL resolution and the fetch limit.

use std::time::Instant;

use proto::router::v1::Outcome;
use proto::router::v1::TimelineEventKind as Kind;

use crate::live::HangupSource;
use crate::runner::{Ending, MAX_FETCHES, Runner, Step, base_params};
use crate::url::WebhookUrl;
use crate::webhook::{WebhookError, WebhookRequest};
use crate::xml::{self, Method, Verb};

/// Instructions being executed and where they came from (for relative URLs).
pub(crate) struct Document {
    /// The verbs, in order.
    pub(crate) verbs: Vec<Verb>,
    /// The URL it came from; none for inline instructions.
    pub(crate) base: Option<WebhookUrl>,
}

enum FetchError {
    Failed(String),
    Hangup(HangupSource),
}

impl Runner {
    pub(crate) fn resolve(
        &self,
        base: Option<&WebhookUrl>,
        reference: &str,
    ) -> Result<WebhookUrl, Ending> {
        let resolved = match base {
            Some(base) => base.join(reference),
            None => WebhookUrl::parse(reference),
        };
        resolved.map_err(|why| {
            let message = format!("bad URL `{reference}` in the instructions: {why}");
            self.note(Kind::Error, message.clone(), &[]);
            Ending::new(Outcome::Failed, message)
        })
    }

    pub(crate) async fn next_document(
        &mut self,
        url: WebhookUrl,
        method: Option<Method>,
        extra: Vec<(String, String)>,
    ) -> Step {
        let method = method.unwrap_or(self.app.method());
        match self.fetch(url, method, extra).await {
            Ok(document) => Step::Next(document),
            Err(ending) => Step::End(ending),
        }
    }

    /// Fetches and parses a document, trying the fallback URL (once per communication)
    /// when that fails.
    pub(crate) async fn fetch(
        &mut self,
        url: WebhookUrl,
        method: Method,
        extra: Vec<(String, String)>,
    ) -> Result<Document, Ending> {
        let why = match self.fetch_once(&url, method, extra.clone()).await {
            Ok(verbs) => {
                return Ok(Document {
                    verbs,
                    base: Some(url),
                });
            }
            Err(FetchError::Hangup(source)) => return Err(Ending::hangup(&source)),
            Err(FetchError::Failed(why)) => why,
        };
        let fallback = WebhookUrl::parse(&self.app.fallback_url).ok();
        let Some(fallback) = fallback.filter(|_| !self.fallback_used) else {
            return Err(Ending::new(Outcome::Failed, why));
        };
        self.fallback_used = true;
        self.note(Kind::Error, format!("{why}; asking the fallback URL"), &[]);
        match self.fetch_once(&fallback, self.app.method(), extra).await {
            Ok(verbs) => Ok(Document {
                verbs,
                base: Some(fallback),
            }),
            Err(FetchError::Hangup(source)) => Err(Ending::hangup(&source)),
            Err(FetchError::Failed(again)) => Err(Ending::new(
                Outcome::Failed,
                format!("{why}; the fallback failed too: {again}"),
            )),
        }
    }

    async fn fetch_once(
        &mut self,
        url: &WebhookUrl,
        method: Method,
        extra: Vec<(String, String)>,
    ) -> Result<Vec<Verb>, FetchError> {
        self.fetches += 1;
        if self.fetches > MAX_FETCHES {
            return Err(FetchError::Failed(format!(
                "more than {MAX_FETCHES} instruction requests"
            )));
        }
        let body = tokio::select! {
            body = self.request(url, method, extra) => body.map_err(FetchError::Failed)?,
            source = self.comm.hangup_requested() => return Err(FetchError::Hangup(source)),
        };
        let text = String::from_utf8(body.to_vec()).map_err(|_| {
            FetchError::Failed(format!("{url} answered with a body that is not UTF-8"))
        })?;
        xml::parse(&text).map_err(|e| {
            let why = format!("{url}: {e}");
            self.note(Kind::Error, why.clone(), &[("url", url.to_string())]);
            FetchError::Failed(why)
        })
    }

    /// One signed request, recorded in the timeline; the body of a 2xx answer.
    pub(crate) async fn request(
        &self,
        url: &WebhookUrl,
        method: Method,
        extra: Vec<(String, String)>,
    ) -> Result<bytes::Bytes, String> {
        let mut params = self.comm.read(base_params);
        params.extend(extra);
        let request = WebhookRequest {
            url,
            method,
            params: &params,
            secret: &self.app.signing_secret,
        };
        let started = Instant::now();
        let result = self.engine.webhooks.send(&request).await;
        let ms = started.elapsed().as_millis().to_string();
        let mut details = vec![
            ("url", url.to_string()),
            ("method", method.as_str().to_owned()),
            ("duration_ms", ms.clone()),
        ];
        match result {
            Ok(response) => {
                details.push(("http_status", response.status.to_string()));
                self.note(
                    Kind::Webhook,
                    format!(
                        "{} {url} -> {} in {ms} ms",
                        method.as_str(),
                        response.status
                    ),
                    &details,
                );
                Ok(response.body)
            }
            Err(err) => {
                if let WebhookError::Status(code) = err {
                    details.push(("http_status", code.to_string()));
                }
                details.push(("error", err.to_string()));
                let message = format!("{} {url} failed: {err}", method.as_str());
                self.note(Kind::Webhook, message.clone(), &details);
                Err(message)
            }
        }
    }
}
