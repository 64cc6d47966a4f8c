//! Field rules of the router's requests; every failure names the field and the rule
//! (INVALID_ARGUMENT), and is found before anything changes.

use std::collections::HashMap;

use base64::Engine as _;
use plumbing::rules::{
    CHANNEL_MAX, PARAMETER_NAME_MAX, PARAMETER_VALUE_MAX, ROUTE_PARAMETERS_MAX, SIGNING_SECRET_MAX,
    SIGNING_SECRET_MIN,
};
use plumbing::validate::{self, FieldError, NAME_MAX};
use proto::router::v1 as pb;

use crate::url::WebhookUrl;
use crate::xml;

/// Signing secret length bounds.
const SECRET_LEN: (usize, usize) = (SIGNING_SECRET_MIN, SIGNING_SECRET_MAX);

/// An application's address (`to`): 1–256 characters of `A-Z a-z 0-9 . _ - : @ +`.
pub fn address(field: &str, value: &str) -> Result<(), FieldError> {
    validate::name(field, value, NAME_MAX)
}

/// A webhook URL field: empty, or an absolute http(s) URL that passes the host rule.
pub fn optional_url(
    field: &str,
    value: &str,
    allow_private: bool,
) -> Result<Option<WebhookUrl>, FieldError> {
    if value.is_empty() {
        return Ok(None);
    }
    let url = WebhookUrl::parse(value).map_err(|rule| FieldError::new(field, rule))?;
    url.check_host(allow_private)
        .map_err(|rule| FieldError::new(field, rule))?;
    Ok(Some(url))
}

/// Checks an application for PutApplication (account and timestamps aside).
pub fn application(app: &pb::Application, allow_private: bool) -> Result<(), FieldError> {
    address("application.address", &app.address)?;
    let url = optional_url(
        "application.instructions_url",
        &app.instructions_url,
        allow_private,
    )?;
    optional_url("application.fallback_url", &app.fallback_url, allow_private)?;
    optional_url(
        "application.status_callback_url",
        &app.status_callback_url,
        allow_private,
    )?;
    match (url.is_some(), app.instructions.is_empty()) {
        (true, false) => {
            return Err(FieldError::new(
                "application.instructions",
                "must be empty when instructions_url is set (exactly one of them)",
            ));
        }
        (false, true) => {
            return Err(FieldError::new(
                "application.instructions_url",
                "exactly one of instructions_url and instructions must be set",
            ));
        }
        (false, false) => {
            xml::parse(&app.instructions)
                .map_err(|e| FieldError::new("application.instructions", e.0))?;
        }
        (true, true) => {}
    }
    if pb::HttpMethod::try_from(app.method).is_err() {
        return Err(FieldError::new(
            "application.method",
            format!("unknown value {}", app.method),
        ));
    }
    if !app.signing_secret.is_empty() {
        let len = app.signing_secret.chars().count();
        if !(SECRET_LEN.0..=SECRET_LEN.1).contains(&len) {
            return Err(FieldError::new(
                "application.signing_secret",
                format!(
                    "must be {} to {} characters, or empty to generate one",
                    SECRET_LEN.0, SECRET_LEN.1
                ),
            ));
        }
    }
    Ok(())
}

/// A new random signing secret (43 URL-safe characters, 256 bits).
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A communication id: 1–128 characters of `A-Z a-z 0-9 . _ : -`.
pub fn communication_id(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > 128 {
        return Err(FieldError::new(field, "must be at most 128 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
    {
        return Err(FieldError::new(
            field,
            "may only contain A-Z a-z 0-9 . _ : -",
        ));
    }
    Ok(())
}

/// A generated communication id.
pub fn new_communication_id() -> String {
    format!("CM{:032x}", rand::random::<u128>())
}

/// Checks a RouteRequest; returns the channel (default `voice`).
pub fn route(request: &pb::RouteRequest) -> Result<String, FieldError> {
    validate::text("from", &request.from, NAME_MAX)?;
    address("to", &request.to)?;
    let channel = if request.channel.is_empty() {
        "voice".to_owned()
    } else {
        request.channel.clone()
    };
    if channel.len() > CHANNEL_MAX
        || !channel
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(FieldError::new(
            "channel",
            format!("must be 1 to {CHANNEL_MAX} characters from [a-z0-9_-]"),
        ));
    }
    if !request.communication_id.is_empty() {
        communication_id("communication_id", &request.communication_id)?;
    }
    parameters("parameters", &request.parameters)?;
    Ok(channel)
}

/// Route parameters: at most [`ROUTE_PARAMETERS_MAX`]; keys 1–[`PARAMETER_NAME_MAX`]
/// characters, values at most [`PARAMETER_VALUE_MAX`].
pub fn parameters(field: &str, params: &HashMap<String, String>) -> Result<(), FieldError> {
    if params.len() > ROUTE_PARAMETERS_MAX {
        return Err(FieldError::new(
            field,
            format!("at most {ROUTE_PARAMETERS_MAX} entries"),
        ));
    }
    for (key, value) in params {
        if key.is_empty() || key.chars().count() > PARAMETER_NAME_MAX {
            return Err(FieldError::new(
                format!("{field}[{key}]"),
                format!("keys must be 1 to {PARAMETER_NAME_MAX} characters"),
            ));
        }
        if value.chars().count() > PARAMETER_VALUE_MAX {
            return Err(FieldError::new(
                format!("{field}[{key}]"),
                format!("values must be at most {PARAMETER_VALUE_MAX} characters"),
            ));
        }
    }
    Ok(())
}

/// A Hangup reason: at most 256 characters.
pub fn reason(value: &str) -> Result<(), FieldError> {
    validate::max_len("reason", value, 1024)?;
    if value.chars().count() > 256 {
        return Err(FieldError::new("reason", "must be at most 256 characters"));
    }
    Ok(())
}
