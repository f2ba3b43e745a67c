use std::net::IpAddr;
use std::path::PathBuf;

use super::outbound::{Decision, is_public};
use super::*;

fn pattern(text: &str) -> UrlPattern {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn url_patterns_match_scheme_host_and_port() {
    let api = pattern("https://api.example.com");
    assert!(api.matches(Scheme::Https, "api.example.com", 443));
    assert!(!api.matches(Scheme::Https, "api.example.com", 8443));
    assert!(!api.matches(Scheme::Http, "api.example.com", 443));
    assert!(!api.matches(Scheme::Https, "evil-api.example.com", 443));

    let subdomains = pattern("https://*.example.com:*");
    assert!(subdomains.matches(Scheme::Https, "a.b.example.com", 9000));
    assert!(!subdomains.matches(Scheme::Https, "example.com", 443));
    assert!(!subdomains.matches(Scheme::Https, "badexample.com", 443));
    assert_eq!(subdomains.private_access(), PrivateAccess::None);
    assert_eq!(
        pattern("https://db.internal").private_access(),
        PrivateAccess::None,
        "a name opens no private address, whatever its DNS says"
    );
    assert_eq!(
        pattern("http://localhost:8080").private_access(),
        PrivateAccess::Loopback
    );

    let local = pattern("http://127.0.0.1:*");
    assert!(local.matches(Scheme::Http, "127.0.0.1", 5000));
    assert_eq!(local.private_access(), PrivateAccess::Named);

    let v6 = pattern("http://[::1]:8080");
    assert!(v6.matches(Scheme::Http, "::1", 8080));
    assert_eq!(v6.to_string(), "http://[::1]:8080");

    let any = pattern("*://*:*");
    assert!(any.matches(Scheme::Http, "anything", 1));
}

#[test]
fn url_patterns_refuse_what_they_cannot_mean() {
    for bad in [
        "api.example.com",
        "ftp://example.com",
        "https://example.com/path",
        "https://user@example.com",
        "https://example.com:0",
        "https://example.com:99999",
        "https://exa mple.com",
        "*://example.com",
        "https://",
    ] {
        assert!(bad.parse::<UrlPattern>().is_err(), "{bad} parsed");
    }
}

#[test]
fn grants_round_trip_through_their_text() {
    for text in [
        "outbound https://api.example.com",
        "outbound http://127.0.0.1:8080",
        "secret SMTP_PASSWORD",
        "dir /srv/in:/data/in:ro",
    ] {
        let grant: Grant = text.parse().unwrap();
        assert_eq!(grant.to_string(), text);
    }
    assert!("secret ../etc/passwd".parse::<Grant>().is_err());
    assert!("dir relative:/data:ro".parse::<Grant>().is_err());
    assert!("dir /srv:/data/../etc:ro".parse::<Grant>().is_err());
    assert!("dir /srv:/data:rwx".parse::<Grant>().is_err());
}

#[test]
fn a_run_gets_only_what_is_declared_and_granted() {
    let declared = Capabilities {
        outbound: vec![
            "https://api.example.com".into(),
            "http://127.0.0.1:*".into(),
        ],
        secrets: vec!["SMTP_PASSWORD".into(), "API_TOKEN".into()],
        dirs: vec!["/data/in:ro".into(), "/data/out:rw".into()],
    };
    let grants = vec![
        Grant::Outbound(pattern("https://api.example.com")),
        Grant::Outbound(pattern("https://other.example.com")),
        Grant::Secret("SMTP_PASSWORD".into()),
        Grant::Secret("UNDECLARED".into()),
        Grant::dir("/srv/in:/data/in:rw").unwrap(),
        Grant::dir("/srv/out:/data/out:rw").unwrap(),
        Grant::dir("/srv/else:/else:rw").unwrap(),
    ];
    let run = RunCapabilities::intersect(&declared, &grants);
    assert_eq!(
        run.outbound.decide(Scheme::Https, "api.example.com", 443),
        Decision::Allowed {
            private: PrivateAccess::None
        }
    );
    assert_eq!(
        run.outbound.decide(Scheme::Https, "other.example.com", 443),
        Decision::NotDeclared
    );
    assert_eq!(
        run.outbound.decide(Scheme::Http, "127.0.0.1", 80),
        Decision::NotGranted
    );
    assert_eq!(
        run.secrets.iter().collect::<Vec<_>>(),
        vec!["SMTP_PASSWORD"]
    );
    assert!(run.ungranted_secrets.contains("API_TOKEN"));
    assert_eq!(
        run.dirs,
        vec![
            // Granted rw, declared ro: read-only.
            Preopen {
                host: PathBuf::from("/srv/in"),
                guest: "/data/in".into(),
                writable: false
            },
            Preopen {
                host: PathBuf::from("/srv/out"),
                guest: "/data/out".into(),
                writable: true
            },
        ]
    );

    let nothing = RunCapabilities::intersect(&Capabilities::default(), &grants);
    assert!(nothing.outbound.is_empty() && nothing.secrets.is_empty() && nothing.dirs.is_empty());
}

#[test]
fn a_wildcard_grant_does_not_open_private_addresses() {
    let declared = Capabilities {
        outbound: vec!["http://*:*".into()],
        ..Capabilities::default()
    };
    let run = RunCapabilities::intersect(&declared, &[Grant::Outbound(pattern("http://*:*"))]);
    assert_eq!(
        run.outbound.decide(Scheme::Http, "127.0.0.1", 8080),
        Decision::Allowed {
            private: PrivateAccess::None
        }
    );
}

#[test]
fn public_addresses_are_told_from_the_rest() {
    let public = [
        "93.184.216.34",
        "8.8.8.8",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
        "2002:808:808::1",
    ];
    let private = [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "::ffff:0:7f00:1",
        "::7f00:1",
        "2002:7f00:1::1",
        "2002:a9fe:a9fe::1",
        "fec0::1",
        "64:ff9b:1::1",
        "100::1",
    ];
    for ip in public {
        assert!(is_public(ip.parse::<IpAddr>().unwrap()), "{ip}");
    }
    for ip in private {
        assert!(!is_public(ip.parse::<IpAddr>().unwrap()), "{ip}");
    }
}

#[test]
fn declarations_are_validated() {
    let bad = Capabilities {
        secrets: vec!["not a name".into()],
        ..Capabilities::default()
    };
    assert!(bad.validate().unwrap_err().contains("not a name"));
    let bad = Capabilities {
        dirs: vec!["/data".into()],
        ..Capabilities::default()
    };
    assert!(bad.validate().is_err());
}

#[test]
fn secrets_are_read_from_files_named_after_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("SMTP_PASSWORD"), "hunter2\n").unwrap();
    let store = SecretStore::new(Some(dir.path().to_path_buf()));
    assert_eq!(store.get("SMTP_PASSWORD").as_deref(), Some("hunter2"));
    assert_eq!(store.get("MISSING_SECRET"), None);
    // A name that is not a secret name never becomes a path.
    std::fs::write(dir.path().join("x"), "outside").unwrap();
    assert_eq!(store.get("../x"), None);
    assert_eq!(
        SecretStore::default().get("SMTP_PASSWORD_NOT_SET_ANYWHERE"),
        None
    );
}
