//! The instructions parser against valid, malformed, hostile and huge documents.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn refused(document: &str) -> String {
    match parse(document) {
        Ok(verbs) => panic!("accepted {document:?} as {verbs:?}"),
        Err(e) => e.0,
    }
}

#[test]
fn parses_every_verb_with_defaults_and_attributes() {
    let verbs = parse(
        r#"<?xml version="1.0" encoding="UTF-8"?>
        <!-- a comment -->
        <Response>
          <Say voice="alice">Hello &amp; welcome &#x263A;</Say>
          <Pause/>
          <Pause length="0"/>
          <Dial timeout="5" action="/after" method="get" timeLimit="60">
            <Client>alice</Client>
            <Client><Identity>bob</Identity><Parameter name="k" value="v &lt;1&gt;"/></Client>
          </Dial>
          <Redirect method="POST">next.xml</Redirect>
          <Reject reason="busy"/>
          <Hangup/>
        </Response>"#,
    )
    .unwrap();
    assert_eq!(verbs.len(), 7);
    assert_eq!(
        verbs[0],
        Verb::Say {
            text: "Hello & welcome \u{263A}".into(),
            attributes: [("voice".to_owned(), "alice".to_owned())].into()
        }
    );
    assert_eq!(verbs[1], Verb::Pause { length: 1 });
    assert_eq!(verbs[2], Verb::Pause { length: 0 });
    let Verb::Dial(dial) = &verbs[3] else {
        panic!("expected a Dial")
    };
    assert_eq!(dial.timeout, 5);
    assert_eq!(dial.time_limit, 60);
    assert_eq!(dial.action.as_deref(), Some("/after"));
    assert_eq!(dial.method, Some(Method::Get));
    assert_eq!(dial.clients[0].identity, "alice");
    assert_eq!(dial.clients[1].identity, "bob");
    assert_eq!(dial.clients[1].parameters["k"], "v <1>");
    assert_eq!(
        verbs[4],
        Verb::Redirect {
            url: "next.xml".into(),
            method: Some(Method::Post)
        }
    );
    assert_eq!(
        verbs[5],
        Verb::Reject {
            reason: RejectReason::Busy
        }
    );
    assert_eq!(verbs[6], Verb::Hangup);
    let Verb::Dial(plain) =
        &parse("<Response><Dial><Client>a</Client></Dial></Response>").unwrap()[0]
    else {
        panic!("expected a Dial")
    };
    assert_eq!((plain.timeout, plain.time_limit), (30, 14_400));
    assert_eq!(parse("<Response/>").unwrap(), vec![]);
}

#[test]
fn refuses_malformed_documents_with_a_reason() {
    for (document, says) in [
        ("", "empty"),
        ("   ", "empty"),
        ("<Response>", "closed"),
        ("<Response><Say>hi</Response>", "malformed"),
        ("<Response></Response><Response/>", "one root"),
        ("<Response>text</Response>", "not text"),
        ("hello <Response/>", "before the root"),
        ("<Response/> trailing", "after the root"),
        ("<Reply/>", "root element must be <Response>"),
        ("<Response><Play>x</Play></Response>", "unknown verb <Play>"),
        (
            "<Response><Dial>+15550100</Dial></Response>",
            "not supported",
        ),
        (
            "<Response><Dial></Dial></Response>",
            "at least one <Client>",
        ),
        (
            "<Response><Dial><Number>1</Number></Dial></Response>",
            "only contain <Client>",
        ),
        (
            "<Response><Dial timeout=\"0\"><Client>a</Client></Dial></Response>",
            "from 1 to 600",
        ),
        (
            "<Response><Dial timeout=\"x\"><Client>a</Client></Dial></Response>",
            "whole number",
        ),
        (
            "<Response><Dial method=\"PUT\"><Client>a</Client></Dial></Response>",
            "GET or POST",
        ),
        (
            "<Response><Dial><Client>a b</Client></Dial></Response>",
            "may only contain",
        ),
        (
            "<Response><Dial><Client></Client></Dial></Response>",
            "must not be empty",
        ),
        (
            "<Response><Reject reason=\"nope\"/></Response>",
            "busy or rejected",
        ),
        (
            "<Response><Pause length=\"61\"/></Response>",
            "from 0 to 60",
        ),
        ("<Response><Hangup>now</Hangup></Response>", "must be empty"),
        ("<Response><Redirect/></Response>", "URL"),
        ("<Response><Say>&nbsp;</Say></Response>", "unknown entity"),
        (
            "<Response><Say a=\"1\" a=\"2\">x</Say></Response>",
            "attribute",
        ),
        (
            "<Response><?php echo 1 ?></Response>",
            "processing instructions",
        ),
        ("<\u{0}Response/>", "must be <Response>"),
    ] {
        let message = refused(document);
        assert!(
            message.contains(says),
            "{document:?}: expected `{says}` in `{message}`"
        );
    }
}

#[test]
fn refuses_entity_expansion_and_external_entities() {
    let billion_laughs = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Response><Say>&lol9;</Say></Response>"#;
    assert!(refused(billion_laughs).contains("DOCTYPE"));
    let external = r#"<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Response><Say>&xxe;</Say></Response>"#;
    assert!(refused(external).contains("DOCTYPE"));
    // Without a DTD an undeclared entity is simply unknown.
    assert!(refused("<Response><Say>&xxe;</Say></Response>").contains("unknown entity"));
}

#[test]
fn refuses_deep_nesting_many_elements_and_huge_documents() {
    let deep = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000));
    assert!(refused(&deep).contains("bytes") || refused(&deep).contains("deeper"));
    let nested = format!(
        "<Response>{}{}</Response>",
        "<Say>".repeat(20),
        "</Say>".repeat(20)
    );
    assert!(refused(&nested).contains("deeper than 8"));
    let many = format!("<Response>{}</Response>", "<Pause/>".repeat(1_500));
    assert!(refused(&many).contains("more than 1000 elements"));
    let huge = format!(
        "<Response><Say>{}</Say></Response>",
        "x".repeat(MAX_DOCUMENT)
    );
    assert!(refused(&huge).contains("at most 65536"));
    let many_attributes = format!(
        "<Response><Say {}>x</Say></Response>",
        (0..40).map(|i| format!("a{i}=\"1\" ")).collect::<String>()
    );
    assert!(refused(&many_attributes).contains("more than 16 attributes"));
    let many_clients = format!(
        "<Response><Dial>{}</Dial></Response>",
        "<Client>a</Client>".repeat(21)
    );
    assert!(refused(&many_clients).contains("at most 20"));
}

#[test]
fn never_panics_on_arbitrary_prefixes_and_byte_soup() {
    let document = r#"<Response><Dial timeout="5" action="/a"><Client><Identity>x</Identity><Parameter name="n" value="&amp;v"/></Client></Dial><Say>&#65;&#x42;</Say></Response>"#;
    for end in 0..=document.len() {
        if let Some(prefix) = document.get(..end) {
            let _ = parse(prefix);
        }
    }
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let alphabet = b"<>/=\"'&;#x!?[]- aAbResponseDialClient";
    for _ in 0..2_000 {
        let soup: String = (0..64)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                alphabet[(seed % alphabet.len() as u64) as usize] as char
            })
            .collect();
        let _ = parse(&soup);
    }
}

#[test]
fn staged_and_sequential_dials_are_parsed_and_their_bad_attributes_named() {
    let Ok(verbs) = parse(
        r#"<Response><Dial timeout="20"><Client>a</Client><Client delay="5">b</Client></Dial></Response>"#,
    ) else {
        panic!("a staged Dial is valid");
    };
    let Verb::Dial(dial) = &verbs[0] else {
        panic!("a Dial");
    };
    assert!(!dial.sequential);
    assert_eq!(
        dial.clients.iter().map(|c| c.delay).collect::<Vec<_>>(),
        [0, 5]
    );
    let Ok(verbs) = parse(
        r#"<Response><Dial sequential="true"><Client timeout="7">a</Client><Client>b</Client></Dial></Response>"#,
    ) else {
        panic!("a sequential Dial is valid");
    };
    let Verb::Dial(dial) = &verbs[0] else {
        panic!("a Dial");
    };
    assert!(dial.sequential);
    assert_eq!(
        dial.clients.iter().map(|c| c.timeout).collect::<Vec<_>>(),
        [Some(7), None]
    );
    for (document, rule) in [
        (
            r#"<Dial sequential="yes"><Client>a</Client></Dial>"#,
            "sequential must be true or false",
        ),
        (
            r#"<Dial><Client delay="601">a</Client></Dial>"#,
            "delay must be a whole number from 0 to 600",
        ),
        (
            r#"<Dial><Client timeout="5">a</Client></Dial>"#,
            "<Client timeout> is for a sequential <Dial>",
        ),
        (
            r#"<Dial sequential="true"><Client delay="5">a</Client></Dial>"#,
            "<Client delay> is for a Dial that rings at once",
        ),
        (
            r#"<Dial sequential="true"><Client timeout="0">a</Client></Dial>"#,
            "timeout must be a whole number from 1 to 600",
        ),
    ] {
        let message = refused(&format!("<Response>{document}</Response>"));
        assert!(message.contains(rule), "{document}: {message}");
    }
}
