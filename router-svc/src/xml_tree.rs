//! The tree a document is parsed into before it is interpreted, and the bounded parser
//! that builds it (see [`super`] for the bounds).

use std::collections::BTreeMap;

use quick_xml::events::{BytesStart, Event};

use super::{MAX_DEPTH, MAX_DOCUMENT, MAX_ELEMENTS, Method, XmlError, err};

/// An element of the parsed tree.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Element {
    pub(super) name: String,
    pub(super) attributes: BTreeMap<String, String>,
    pub(super) children: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    pub(super) fn text(&self) -> Result<String, XmlError> {
        let mut text = String::new();
        for child in &self.children {
            match child {
                Node::Text(t) => text.push_str(t),
                Node::Element(e) => {
                    return err(format!(
                        "<{}> may only contain text, not <{}>",
                        self.name, e.name
                    ));
                }
            }
        }
        Ok(text.trim().to_owned())
    }

    pub(super) fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|c| match c {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub(super) fn has_text(&self) -> bool {
        self.children
            .iter()
            .any(|c| matches!(c, Node::Text(t) if !t.trim().is_empty()))
    }

    pub(super) fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }

    pub(super) fn number(
        &self,
        name: &str,
        (default, min, max): (u32, u32, u32),
    ) -> Result<u32, XmlError> {
        let Some(value) = self.attribute(name) else {
            return Ok(default);
        };
        match value.trim().parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => err(format!(
                "<{} {name}=\"{value}\">: {name} must be a whole number from {min} to {max}",
                self.name
            )),
        }
    }

    pub(super) fn method(&self) -> Result<Option<Method>, XmlError> {
        match self
            .attribute("method")
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None => Ok(None),
            Some("GET") => Ok(Some(Method::Get)),
            Some("POST") => Ok(Some(Method::Post)),
            Some(other) => err(format!(
                "<{} method=\"{other}\">: method must be GET or POST",
                self.name
            )),
        }
    }

    /// (depth, element count) of the tree under and including this element.
    pub(super) fn shape(&self) -> (usize, usize) {
        self.elements()
            .map(Element::shape)
            .fold((1, 1), |(depth, count), (d, c)| {
                (depth.max(d + 1), count + c)
            })
    }

    pub(super) fn no_children(&self) -> Result<(), XmlError> {
        if self.children.is_empty() || (!self.has_text() && self.elements().next().is_none()) {
            Ok(())
        } else {
            err(format!("<{}> must be empty", self.name))
        }
    }
}

/// Parses `document` into a tree under the module's bounds.
pub(super) fn parse_tree(document: &str) -> Result<Element, XmlError> {
    if document.len() > MAX_DOCUMENT {
        return err(format!(
            "the document is {} bytes; at most {MAX_DOCUMENT} are accepted",
            document.len()
        ));
    }
    let mut reader = quick_xml::Reader::from_str(document);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let position = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| XmlError(format!("malformed XML at byte {position}: {e}")))?;
        match event {
            Event::Start(start) | Event::Empty(start) if root.is_some() => {
                let _ = start;
                return err("only one root element is allowed");
            }
            Event::Start(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return err(format!("more than {MAX_ELEMENTS} elements"));
                }
                if stack.len() >= MAX_DEPTH {
                    return err(format!("elements nest deeper than {MAX_DEPTH} levels"));
                }
                stack.push(element(&start)?);
            }
            Event::Empty(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return err(format!("more than {MAX_ELEMENTS} elements"));
                }
                if stack.len() >= MAX_DEPTH {
                    return err(format!("elements nest deeper than {MAX_DEPTH} levels"));
                }
                let element = element(&start)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(element)),
                    None => root = Some(element),
                }
            }
            Event::End(_) => {
                let Some(done) = stack.pop() else {
                    return err("unbalanced end tag");
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(done)),
                    None => root = Some(done),
                }
            }
            Event::Text(text) => {
                let text = text
                    .xml_content()
                    .map_err(|e| XmlError(format!("undecodable text: {e}")))?;
                push_text(&mut stack, &root, &text)?;
            }
            Event::CData(data) => {
                let text = data
                    .decode()
                    .map_err(|e| XmlError(format!("undecodable CDATA: {e}")))?;
                push_text(&mut stack, &root, &text)?;
            }
            Event::GeneralRef(reference) => {
                let resolved = if reference.is_char_ref() {
                    reference
                        .resolve_char_ref()
                        .map_err(|e| XmlError(format!("bad character reference: {e}")))?
                        .map(String::from)
                } else {
                    let name = reference
                        .decode()
                        .map_err(|e| XmlError(format!("undecodable reference: {e}")))?;
                    quick_xml::escape::resolve_predefined_entity(&name).map(str::to_owned)
                };
                let Some(resolved) = resolved else {
                    return err(
                        "unknown entity reference; only &amp; &lt; &gt; &quot; &apos; and character references are allowed",
                    );
                };
                push_text(&mut stack, &root, &resolved)?;
            }
            Event::DocType(_) => {
                return err("DOCTYPE declarations are not allowed (no DTDs, no entities)");
            }
            Event::PI(_) => return err("processing instructions are not allowed"),
            Event::Decl(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return err("the document ends before its elements are closed");
    }
    root.ok_or_else(|| XmlError("the document is empty; expected <Response>".into()))
}

fn push_text(stack: &mut [Element], root: &Option<Element>, text: &str) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => {
            match parent.children.last_mut() {
                Some(Node::Text(previous)) => previous.push_str(text),
                _ => parent.children.push(Node::Text(text.to_owned())),
            }
            Ok(())
        }
        None if text.trim().is_empty() => Ok(()),
        None if root.is_some() => err("text after the root element"),
        None => err("text before the root element"),
    }
}

fn element(start: &BytesStart<'_>) -> Result<Element, XmlError> {
    let name = String::from_utf8(start.name().as_ref().to_vec())
        .map_err(|_| XmlError("an element name is not UTF-8".into()))?;
    let mut attributes = BTreeMap::new();
    for attribute in start.attributes() {
        let attribute =
            attribute.map_err(|e| XmlError(format!("bad attribute in <{name}>: {e}")))?;
        let key = String::from_utf8(attribute.key.as_ref().to_vec())
            .map_err(|_| XmlError("an attribute name is not UTF-8".into()))?;
        let value = attribute
            .unescape_value()
            .map_err(|e| XmlError(format!("bad value of {key} in <{name}>: {e}")))?;
        if attributes.len() >= 16 {
            return err(format!("<{name}> has more than 16 attributes"));
        }
        attributes.insert(key, value.into_owned());
    }
    Ok(Element {
        name,
        attributes,
        children: Vec::new(),
    })
}
