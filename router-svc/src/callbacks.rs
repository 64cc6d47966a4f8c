//! Status callbacks: a signed POST to the application's `status_callback_url` on each state
//! change of a communication, in order, from one small task per communication, never
//! holding the communication up.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::apps::AppRecord;
use crate::url::WebhookUrl;
use crate::webhook::{WebhookClient, WebhookRequest};
use crate::xml::Method;

/// Sends one communication's status callbacks, in order.
#[derive(Debug, Clone)]
pub struct StatusCallbacks {
    queue: mpsc::UnboundedSender<Vec<(String, String)>>,
}

impl StatusCallbacks {
    /// A sender for `app`'s callbacks, if it has a callback URL.
    pub fn start(app: &Arc<AppRecord>, client: &WebhookClient) -> Option<Self> {
        let url = WebhookUrl::parse(&app.status_callback_url).ok()?;
        let (queue, mut pending) = mpsc::unbounded_channel::<Vec<(String, String)>>();
        let (app, client) = (app.clone(), client.clone());
        tokio::spawn(async move {
            while let Some(params) = pending.recv().await {
                let request = WebhookRequest {
                    url: &url,
                    method: Method::Post,
                    params: &params,
                    secret: &app.signing_secret,
                };
                if let Err(err) = client.send(&request).await {
                    tracing::debug!(url = %url, error = %err, "status callback failed");
                }
            }
        });
        Some(Self { queue })
    }

    /// Queues one callback with these parameters.
    pub fn send(&self, params: Vec<(String, String)>) {
        let _ = self.queue.send(params);
    }
}
