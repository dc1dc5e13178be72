//! Each policy against the connections and filters it must allow or refuse.

use super::*;

fn connect<'a>(username: Option<&'a str>) -> ConnectInfo<'a> {
    ConnectInfo {
        client_id: "c1",
        username,
        password: None,
        certificate: None,
        certificate_role: Role::Device,
    }
}

#[test]
fn allow_all_allows_anonymous_clients_anywhere() {
    let p = AllowAll.authenticate(&connect(None)).unwrap();
    assert_eq!(p.identity, None);
    let topic = Topic::parse("dt/f/other/telemetry").unwrap();
    assert!(AllowAll.may_publish(&p, &topic));
}

#[test]
fn own_device_only_pins_the_device_to_the_username() {
    assert_eq!(
        OwnDeviceOnly.authenticate(&connect(None)),
        Err(ConnectRefusal::NotAuthorized)
    );
    assert_eq!(
        OwnDeviceOnly.authenticate(&connect(Some(""))),
        Err(ConnectRefusal::NotAuthorized)
    );
    let p = OwnDeviceOnly.authenticate(&connect(Some("dev-1"))).unwrap();
    let own = Topic::parse("dt/f/dev-1/telemetry").unwrap();
    let other = Topic::parse("dt/f/dev-2/telemetry").unwrap();
    assert!(OwnDeviceOnly.may_publish(&p, &own));
    assert!(!OwnDeviceOnly.may_publish(&p, &other));
}

/// A device logging in with a username and password; the users file's tests
/// use it too.
pub(crate) fn login<'a>(user: &'a str, password: &'a str) -> ConnectInfo<'a> {
    ConnectInfo {
        client_id: "c1",
        username: Some(user),
        password: Some(password.as_bytes()),
        certificate: None,
        certificate_role: Role::Device,
    }
}

#[test]
fn a_users_file_checks_credentials_then_pins_the_device() {
    let text = format!(
        "# devices\n\n{}\n{}  # spare\n{}\n",
        UsersFile::entry("dev-1", "s3cret-token", b"salt-1"),
        UsersFile::entry("dev-2", "other-token", b"salt-2"),
        UsersFile::entry("site:7", "token-7", b"salt-7"),
    );
    let users = UsersFile::parse(&text).unwrap();
    assert_eq!(users.len(), 3);
    let p = users.authenticate(&login("site:7", "token-7")).unwrap();
    assert!(users.may_publish(&p, &Topic::parse("dt/f/site:7/telemetry").unwrap()));

    let p = users.authenticate(&login("dev-1", "s3cret-token")).unwrap();
    assert_eq!(p.identity.as_deref(), Some("dev-1"));
    assert!(users.may_publish(&p, &Topic::parse("dt/f/dev-1/telemetry").unwrap()));
    assert!(!users.may_publish(&p, &Topic::parse("dt/f/dev-2/telemetry").unwrap()));

    for (user, password) in [("dev-1", "other-token"), ("dev-9", "s3cret-token")] {
        assert_eq!(
            users.authenticate(&login(user, password)),
            Err(ConnectRefusal::BadCredentials)
        );
    }
    assert_eq!(
        users.authenticate(&connect(None)),
        Err(ConnectRefusal::NotAuthorized)
    );
}

#[test]
fn a_users_file_with_a_bad_line_names_it() {
    let good = UsersFile::entry("dev-1", "t", b"s");
    for (text, line) in [
        (format!("{good}\ndev-2:plain:pw"), 2),
        ("dev-1:sha256:zz:00".to_string(), 1),
        (format!("\n{good}\n{good}"), 3),
        (":sha256:00:00".to_string(), 1),
    ] {
        match UsersFile::parse(&text) {
            Err(UsersFileError::Line { line: l, .. }) => assert_eq!(l, line, "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

fn with_cert<'a>(username: Option<&'a str>, certificate: &'a str) -> ConnectInfo<'a> {
    ConnectInfo {
        client_id: "c1",
        username,
        password: None,
        certificate: Some(certificate),
        certificate_role: Role::Device,
    }
}

#[test]
fn a_certificate_names_the_device_under_every_policy() {
    let users = UsersFile::parse(&UsersFile::entry("dev-1", "t", b"s")).unwrap();
    let policies: [&dyn Authorizer; 4] = [&AllowAll, &OwnDeviceOnly, &ClientCertificates, &users];
    let own = Topic::parse("dt/f/dev-9/telemetry").unwrap();
    let other = Topic::parse("dt/f/dev-1/telemetry").unwrap();
    for (i, policy) in policies.into_iter().enumerate() {
        for username in [None, Some(""), Some("dev-9")] {
            let p = policy.authenticate(&with_cert(username, "dev-9")).unwrap();
            assert_eq!(p.identity.as_deref(), Some("dev-9"), "policy {i}");
            assert!(policy.may_publish(&p, &own));
            assert_eq!(policy.may_publish(&p, &other), i == 0, "policy {i}");
        }
    }
    for policy in [
        &OwnDeviceOnly as &dyn Authorizer,
        &ClientCertificates,
        &users,
    ] {
        assert_eq!(
            policy.authenticate(&with_cert(Some("dev-1"), "dev-9")),
            Err(ConnectRefusal::NotAuthorized),
            "a username that contradicts the certificate"
        );
    }
    assert_eq!(
        ClientCertificates.authenticate(&login("dev-1", "t")),
        Err(ConnectRefusal::NotAuthorized),
        "a password is no certificate"
    );
}

#[test]
fn a_device_filter_must_name_the_device_at_the_device_level() {
    for own in [
        "dt/f/dev-b/telemetry",
        "dt/+/dev-b/telemetry",
        "dt/f/dev-b/#",
        "dt/+/dev-b/+",
        "dt/f/dev-b",
    ] {
        assert!(only_own_topics(own, "dev-b"), "{own}");
    }
    for other in [
        "#",
        "+/f/dev-b/telemetry",
        "dt/#",
        "dt/+/#",
        "dt/f/#",
        "dt/f/+/telemetry",
        "dt/f/dev-a/telemetry",
        "dt/f/dev-bb/telemetry",
        "dt/f",
        "dt",
        "xt/f/dev-b/telemetry",
    ] {
        assert!(!only_own_topics(other, "dev-b"), "{other}");
    }
    // An identity that is itself a wildcard is no licence to use one.
    assert!(!only_own_topics("dt/f/+/telemetry", "+"));
    assert!(!only_own_topics("dt/f/#", "#"));
}

fn principal(identity: &str, role: Role) -> Principal {
    Principal {
        client_id: "c".into(),
        identity: Some(identity.into()),
        role,
    }
}

#[test]
fn only_an_operator_may_subscribe_beyond_its_device() {
    let device = principal("dev-b", Role::Device);
    let operator = Principal {
        role: Role::Operator,
        ..device.clone()
    };
    let anonymous = Principal {
        identity: None,
        ..device.clone()
    };
    let users = UsersFile::default();
    let policies: [&dyn Authorizer; 3] = [&OwnDeviceOnly, &ClientCertificates, &users];
    for policy in policies {
        assert!(policy.may_subscribe(&device, "dt/f/dev-b/telemetry"));
        assert!(!policy.may_subscribe(&device, "dt/#"));
        assert!(policy.may_subscribe(&operator, "dt/#"));
        assert!(!policy.may_subscribe(&anonymous, "dt/f/dev-b/telemetry"));
    }
    assert!(AllowAll.may_subscribe(&anonymous, "#"));
}

#[test]
fn only_an_operator_may_watch_the_alerts_on_the_tap() {
    // A device named like the alert topic's levels gains nothing by it.
    let devices = [
        principal("dev-b", Role::Device),
        principal("iotpipe", Role::Device),
        principal("alerts", Role::Device),
    ];
    let operator = principal("ops", Role::Operator);
    let users = UsersFile::default();
    let policies: [&dyn Authorizer; 3] = [&OwnDeviceOnly, &ClientCertificates, &users];
    let alert_filters = [
        "iotpipe/alerts/#",
        "iotpipe/alerts/hot",
        "iotpipe/#",
        "+/alerts/#",
        "+/+/+",
        "#",
    ];
    for policy in policies {
        for device in &devices {
            for filter in alert_filters {
                assert!(
                    !policy.may_subscribe(device, filter),
                    "{device:?} on {filter}"
                );
            }
        }
        assert!(policy.may_subscribe(&operator, "iotpipe/alerts/#"));
        assert!(policy.may_subscribe(&operator, "iotpipe/alerts/hot"));
    }
    // Without authentication (the local default) everyone may.
    assert!(AllowAll.may_subscribe(&devices[0], "iotpipe/alerts/#"));
}

#[test]
fn an_operator_still_publishes_only_as_itself() {
    let operator = principal("ops", Role::Operator);
    let own = Topic {
        fleet: "f",
        device_id: "ops",
    };
    let other = Topic {
        fleet: "f",
        device_id: "dev-a",
    };
    let users = UsersFile::default();
    let policies: [&dyn Authorizer; 3] = [&OwnDeviceOnly, &ClientCertificates, &users];
    for policy in policies {
        assert!(policy.may_publish(&operator, &own));
        assert!(!policy.may_publish(&operator, &other));
    }
}

#[test]
fn a_users_file_role_column_is_optional() {
    let text = format!(
        "{}\n{}\n{}:device\n",
        UsersFile::entry("dev-1", "t1", b"s1"),
        UsersFile::entry_as("ops:1", "t2", b"s2", Role::Operator),
        UsersFile::entry("dev-3", "t3", b"s3"),
    );
    assert!(
        text.lines().nth(1).unwrap().ends_with(":operator"),
        "{text}"
    );
    let users = UsersFile::parse(&text).unwrap();
    for (user, password, role) in [
        ("dev-1", "t1", Role::Device),
        ("ops:1", "t2", Role::Operator),
        ("dev-3", "t3", Role::Device),
    ] {
        let p = users.authenticate(&login(user, password)).unwrap();
        assert_eq!((p.identity.as_deref(), p.role), (Some(user), role));
    }
    let lines: Vec<_> = text.lines().filter_map(UsersFile::line_username).collect();
    assert_eq!(lines, ["dev-1", "ops:1", "dev-3"]);
    let unknown = format!("{}:admin", UsersFile::entry("dev-1", "t", b"s"));
    assert!(
        UsersFile::parse(&unknown).is_err(),
        "an unknown role is an error"
    );
}

#[test]
fn line_usernames_match_what_parse_reads() {
    assert_eq!(
        UsersFile::line_username("site:7:sha256:00:11 # x"),
        Some("site:7")
    );
    for line in [
        "",
        "# dev-1:sha256:00:11",
        "dev-1:plain:00",
        ":sha256:00:11",
    ] {
        assert_eq!(UsersFile::line_username(line), None, "{line}");
    }
}
