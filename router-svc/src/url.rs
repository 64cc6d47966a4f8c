//! Webhook URLs: a strict parser for the absolute `http`/`https` URLs applications name,
//! resolution of the relative URLs instructions may contain, and the SSRF rule — which
//! addresses a webhook may never reach unless private webhooks are allowed.
//!
//! The parser accepts less than a browser: no user info, no fragments, ASCII only, hosts that
//! are DNS names, IPv4 literals or bracketed IPv6 literals. What it accepts it keeps
//! byte-for-byte, because the signature covers the URL exactly as written.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use plumbing::rules::URL_MAX;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

/// A parsed absolute webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    text: String,
    /// The scheme.
    pub scheme: Scheme,
    /// The host: a DNS name, or an IP literal without brackets.
    pub host: String,
    /// The port (explicit or the scheme's default).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path_and_query: String,
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl WebhookUrl {
    /// Parses an absolute URL; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > URL_MAX {
            return Err(format!("must be at most {URL_MAX} bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be ASCII without spaces or control characters".into());
        }
        let (scheme, rest) = if let Some(rest) = strip_prefix_ci(text, "http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = strip_prefix_ci(text, "https://") {
            (Scheme::Https, rest)
        } else {
            return Err("must be an absolute http:// or https:// URL".into());
        };
        if text.contains('#') {
            return Err("must not contain a fragment (#)".into());
        }
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(split);
        if authority.contains('@') {
            return Err("must not contain user info (user@host)".into());
        }
        let (host, port) = split_host_port(authority)?;
        let port = match (port, scheme) {
            (Some(port), _) => port,
            (None, Scheme::Http) => 80,
            (None, Scheme::Https) => 443,
        };
        let path_and_query = if tail.starts_with('/') {
            tail.to_owned()
        } else {
            format!("/{tail}")
        };
        Ok(Self {
            text: text.to_owned(),
            scheme,
            host,
            port,
            path_and_query,
        })
    }

    /// Resolves `reference` (absolute, `/absolute-path` or relative path) against this URL.
    pub fn join(&self, reference: &str) -> Result<Self, String> {
        let reference = reference.trim();
        if reference.contains("://") {
            return Self::parse(reference);
        }
        if reference.starts_with("//") {
            return Err("scheme-relative URLs (//host) are not supported".into());
        }
        let origin = self.origin();
        if reference.starts_with('/') {
            return Self::parse(&format!("{origin}{reference}"));
        }
        let path = self
            .path_and_query
            .split('?')
            .next()
            .unwrap_or("/")
            .to_owned();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        if reference.starts_with('?') {
            return Self::parse(&format!("{origin}{path}{reference}"));
        }
        Self::parse(&format!("{origin}{dir}{reference}"))
    }

    /// `scheme://host[:port]` as written.
    fn origin(&self) -> String {
        let scheme_len = match self.scheme {
            Scheme::Http => "http://".len(),
            Scheme::Https => "https://".len(),
        };
        let rest = &self.text[scheme_len..];
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        self.text[..scheme_len + end].to_owned()
    }

    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host's IP when it is a literal.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// Refuses hosts that are certainly not public before any DNS lookup: IP literals in
    /// non-public ranges, `localhost` and names under `.localhost`.
    pub fn check_host(&self, allow_private: bool) -> Result<(), String> {
        if allow_private {
            return Ok(());
        }
        let lower = self.host.to_ascii_lowercase();
        if lower == "localhost" || lower.ends_with(".localhost") {
            return Err(format!(
                "host `{}` is loopback; private webhook targets are refused (--allow-private-webhooks)",
                self.host
            ));
        }
        match self.literal_ip() {
            Some(ip) if !is_public(ip) => Err(refusal(&self.host, ip)),
            _ => Ok(()),
        }
    }
}

/// Why an address is refused, for errors and the timeline.
pub fn refusal(host: &str, ip: IpAddr) -> String {
    format!(
        "host `{host}` resolves to {ip}, a loopback, private, link-local or otherwise non-public address; refused (the router allows these only with --allow-private-webhooks)"
    )
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    (text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &text[prefix.len()..])
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or("has an unterminated IPv6 literal ([...)")?;
        let host = &rest[..end];
        host.parse::<Ipv6Addr>()
            .map_err(|_| format!("`[{host}]` is not an IPv6 address"))?;
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err("has characters after the IPv6 literal".into()),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err("must name a host".into());
    }
    let is_ipv6 = host.contains(':');
    if !is_ipv6
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("host `{host}` is not a DNS name or IP address"));
    }
    let port = match port {
        Some(port) => Some(
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port `{port}` is not a number from 1 to 65535"))?,
        ),
        None => None,
    };
    Ok((host, port))
}

/// Whether a webhook may reach `ip` without `--allow-private-webhooks`: only globally
/// routable unicast addresses.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64 to anything
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_urls_and_keeps_them_as_written() {
        let url = WebhookUrl::parse("https://Example.com:8443/a/b?x=1").unwrap();
        assert_eq!(url.scheme, Scheme::Https);
        assert_eq!(url.host, "Example.com");
        assert_eq!(url.port, 8443);
        assert_eq!(url.path_and_query, "/a/b?x=1");
        assert_eq!(url.as_str(), "https://Example.com:8443/a/b?x=1");
        let bare = WebhookUrl::parse("http://[::1]").unwrap();
        assert_eq!((bare.host.as_str(), bare.port), ("::1", 80));
        assert_eq!(bare.path_and_query, "/");
        for bad in [
            "ftp://x",
            "http://",
            "http://u@h/",
            "http://h/#f",
            "http://h:0/",
            "http://h:99999/",
            "http://h h/",
            "/relative",
            "http://[::1/",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn joins_relative_references() {
        let base = WebhookUrl::parse("http://h:8080/app/voice?x=1").unwrap();
        assert_eq!(
            base.join("next").unwrap().as_str(),
            "http://h:8080/app/next"
        );
        assert_eq!(base.join("/top").unwrap().as_str(), "http://h:8080/top");
        assert_eq!(
            base.join("?y=2").unwrap().as_str(),
            "http://h:8080/app/voice?y=2"
        );
        assert_eq!(base.join("https://o/p").unwrap().as_str(), "https://o/p");
        assert!(base.join("//o/p").is_err());
    }

    #[test]
    fn only_public_addresses_pass_the_ssrf_rule() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        let local = WebhookUrl::parse("http://localhost:9/").unwrap();
        assert!(local.check_host(false).is_err());
        assert!(local.check_host(true).is_ok());
        let metadata = WebhookUrl::parse("http://169.254.169.254/latest").unwrap();
        assert!(metadata.check_host(false).is_err());
    }
}
