//! Instructions: the XML `<Response>` documents applications answer with, parsed by a real
//! XML parser (quick-xml) under hard bounds, then interpreted into [`Verb`]s.
//!
//! Bounds make hostile documents cheap to refuse: at most [`MAX_DOCUMENT`] bytes (checked
//! before parsing), no DTD at all (so no entity definitions: billion-laughs and external
//! entities cannot even be expressed), only the five predefined entities and character
//! references, nesting at most [`MAX_DEPTH`], at most [`MAX_ELEMENTS`] elements. Parsing
//! builds a small tree first ([`Element`]) so that interpretation sees a whole, valid
//! document or nothing: a document with an unknown verb runs no verb at all.

use std::collections::BTreeMap;

use self::tree::{Element, Node, parse_tree};

// The document's size and shape bounds are the contract's limits (plumbing::rules), under
// the names this module uses.
pub use plumbing::rules::{
    CLIENT_PARAMETERS_MAX as MAX_PARAMETERS, DIAL_CLIENTS_MAX as MAX_CLIENTS,
    INSTRUCTIONS_MAX_BYTES as MAX_DOCUMENT, INSTRUCTIONS_MAX_DEPTH as MAX_DEPTH,
    INSTRUCTIONS_MAX_ELEMENTS as MAX_ELEMENTS,
};
/// Dial `timeout` default and bounds, seconds.
pub const DIAL_TIMEOUT: (u32, u32, u32) = (30, 1, 600);
/// Dial `timeLimit` default and bounds, seconds.
pub const TIME_LIMIT: (u32, u32, u32) = (14_400, 1, 86_400);
/// `<Client delay>` default and bounds, seconds.
pub const CLIENT_DELAY: (u32, u32, u32) = (0, 0, 600);
/// Pause `length` default and bounds, seconds.
pub const PAUSE_LENGTH: (u32, u32, u32) = (1, 0, 60);

/// An HTTP method for a URL the instructions name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET, parameters in the query.
    Get,
    /// POST, parameters as a form body.
    Post,
}

impl Method {
    /// `GET` or `POST`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// How `<Reject>` refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// `reason="busy"`.
    Busy,
    /// `reason="rejected"` (the default).
    Rejected,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Verb {
    /// Text to speak; recorded in the timeline.
    Say {
        /// The text.
        text: String,
        /// Its attributes (voice, language, loop), recorded as given.
        attributes: BTreeMap<String, String>,
    },
    /// Wait this many seconds.
    Pause {
        /// Seconds.
        length: u32,
    },
    /// Refuse the communication.
    Reject {
        /// Why.
        reason: RejectReason,
    },
    /// End the communication.
    Hangup,
    /// Fetch new instructions from a URL.
    Redirect {
        /// The URL, possibly relative.
        url: String,
        /// The method, if given.
        method: Option<Method>,
    },
    /// Ring clients.
    Dial(Dial),
}

impl Verb {
    /// The verb's element name.
    pub fn name(&self) -> &'static str {
        match self {
            Verb::Say { .. } => "Say",
            Verb::Pause { .. } => "Pause",
            Verb::Reject { .. } => "Reject",
            Verb::Hangup => "Hangup",
            Verb::Redirect { .. } => "Redirect",
            Verb::Dial(_) => "Dial",
        }
    }
}

/// `<Dial>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dial {
    /// Seconds to ring before giving up.
    pub timeout: u32,
    /// URL asked what to do when the Dial ends.
    pub action: Option<String>,
    /// Method for `action`.
    pub method: Option<Method>,
    /// Longest connected duration, seconds.
    pub time_limit: u32,
    /// Ring the Clients one at a time, in order (`sequential="true"`), each for its own
    /// timeout; otherwise all at once (each after its `delay`).
    pub sequential: bool,
    /// Who to ring.
    pub clients: Vec<ClientNoun>,
}

/// `<Client>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientNoun {
    /// The identity to ring.
    pub identity: String,
    /// Parameters passed to the devices in the offer.
    pub parameters: BTreeMap<String, String>,
    /// Seconds after the Dial starts before this Client is rung (`delay`; it is rung at
    /// once instead when every leg started before it has ended).
    pub delay: u32,
    /// Seconds this Client rings in a sequential Dial (`timeout`; default the Dial's).
    pub timeout: Option<u32>,
}

/// Why a document was refused; `Display` is the message for the timeline or the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instructions: {0}")]
pub struct XmlError(pub String);

pub(crate) fn err<T>(message: impl Into<String>) -> Result<T, XmlError> {
    Err(XmlError(message.into()))
}

/// Parses and interprets a document.
pub fn parse(document: &str) -> Result<Vec<Verb>, XmlError> {
    let root = parse_tree(document)?;
    if root.name != "Response" {
        return err(format!(
            "the root element must be <Response>, not <{}>",
            root.name
        ));
    }
    let mut verbs = Vec::new();
    for child in &root.children {
        match child {
            Node::Text(text) if text.trim().is_empty() => {}
            Node::Text(_) => return err("<Response> may only contain verbs, not text"),
            Node::Element(element) => verbs.push(verb(element)?),
        }
    }
    Ok(verbs)
}

/// The nesting depth and the element count of `document` as the bounded parser reads it,
/// for the `instruction_xml` fuzz target to check against [`MAX_DEPTH`] and [`MAX_ELEMENTS`].
#[doc(hidden)]
pub fn tree_shape(document: &str) -> Result<(usize, usize), XmlError> {
    parse_tree(document).map(|root| root.shape())
}

fn verb(element: &Element) -> Result<Verb, XmlError> {
    match element.name.as_str() {
        "Say" => Ok(Verb::Say {
            text: element.text()?,
            attributes: element.attributes.clone(),
        }),
        "Pause" => {
            element.no_children()?;
            Ok(Verb::Pause {
                length: element.number("length", PAUSE_LENGTH)?,
            })
        }
        "Reject" => {
            element.no_children()?;
            let reason = match element.attribute("reason") {
                None | Some("rejected") => RejectReason::Rejected,
                Some("busy") => RejectReason::Busy,
                Some(other) => {
                    return err(format!(
                        "<Reject reason=\"{other}\">: reason must be busy or rejected"
                    ));
                }
            };
            Ok(Verb::Reject { reason })
        }
        "Hangup" => {
            element.no_children()?;
            Ok(Verb::Hangup)
        }
        "Redirect" => {
            let url = element.text()?;
            if url.is_empty() {
                return err("<Redirect> must contain the URL to fetch");
            }
            Ok(Verb::Redirect {
                url,
                method: element.method()?,
            })
        }
        "Dial" => dial(element).map(Verb::Dial),
        other => err(format!(
            "unknown verb <{other}>; known verbs: Dial, Say, Pause, Reject, Hangup, Redirect"
        )),
    }
}

fn dial(element: &Element) -> Result<Dial, XmlError> {
    if element.has_text() {
        return err(
            "<Dial> with a number or address as text is not supported; dial identities with <Client>",
        );
    }
    let mut clients = Vec::new();
    for noun in element.elements() {
        if noun.name != "Client" {
            return err(format!(
                "<Dial> may only contain <Client>, not <{}>",
                noun.name
            ));
        }
        clients.push(client(noun)?);
    }
    if clients.is_empty() {
        return err("<Dial> must contain at least one <Client>");
    }
    if clients.len() > MAX_CLIENTS {
        return err(format!(
            "<Dial> may contain at most {MAX_CLIENTS} <Client> nouns"
        ));
    }
    let action = element
        .attribute("action")
        .map(str::trim)
        .map(str::to_owned);
    if action.as_deref() == Some("") {
        return err("<Dial action=\"\">: action must be a URL when present");
    }
    let sequential = match element.attribute("sequential").map(str::trim) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return err(format!(
                "<Dial sequential=\"{other}\">: sequential must be true or false"
            ));
        }
    };
    if sequential && clients.iter().any(|c| c.delay > 0) {
        return err(
            "<Client delay> is for a Dial that rings at once; a sequential <Dial> rings each <Client> in turn",
        );
    }
    if !sequential && clients.iter().any(|c| c.timeout.is_some()) {
        return err(
            "<Client timeout> is for a sequential <Dial>; a Dial that rings at once uses the Dial's timeout",
        );
    }
    Ok(Dial {
        timeout: element.number("timeout", DIAL_TIMEOUT)?,
        action,
        method: element.method()?,
        time_limit: element.number("timeLimit", TIME_LIMIT)?,
        sequential,
        clients,
    })
}

fn client(noun: &Element) -> Result<ClientNoun, XmlError> {
    let mut identity = None;
    let mut parameters = BTreeMap::new();
    if noun.elements().next().is_none() {
        identity = Some(noun.text()?);
    } else {
        if noun.has_text() {
            return err("<Client> has both text and <Identity>/<Parameter> children");
        }
        for child in noun.elements() {
            match child.name.as_str() {
                "Identity" if identity.is_none() => identity = Some(child.text()?),
                "Identity" => return err("<Client> may contain only one <Identity>"),
                "Parameter" => {
                    let (Some(name), Some(value)) =
                        (child.attribute("name"), child.attribute("value"))
                    else {
                        return err("<Parameter> needs both name and value attributes");
                    };
                    if name.is_empty() || name.chars().count() > 64 || value.chars().count() > 1024
                    {
                        return err(
                            "<Parameter>: name must be 1 to 64 characters and value at most 1024",
                        );
                    }
                    parameters.insert(name.to_owned(), value.to_owned());
                }
                other => {
                    return err(format!(
                        "<Client> may only contain <Identity> and <Parameter>, not <{other}>"
                    ));
                }
            }
        }
    }
    let identity = identity.unwrap_or_default();
    plumbing::validate::name("Client", &identity, plumbing::validate::NAME_MAX)
        .map_err(|e| XmlError(format!("<Client> identity `{identity}`: {}", e.rule)))?;
    if parameters.len() > MAX_PARAMETERS {
        return err(format!(
            "<Client> may have at most {MAX_PARAMETERS} <Parameter>s"
        ));
    }
    let timeout = match noun.attribute("timeout") {
        None => None,
        Some(_) => Some(noun.number("timeout", DIAL_TIMEOUT)?),
    };
    Ok(ClientNoun {
        identity,
        parameters,
        delay: noun.number("delay", CLIENT_DELAY)?,
        timeout,
    })
}

#[path = "xml_tree.rs"]
mod tree;

#[cfg(test)]
#[path = "xml_tests.rs"]
mod tests;
