//! Who may connect, and where a connection may publish.
//!
//! One small trait, called on the connection's own task for every CONNECT and
//! every PUBLISH; it must not block (no I/O per call: load policy up front).

use schemas::Topic;

/// What a client presented in its CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

/// Who a connection is, as decided at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    /// The identity the policy checks topics against: the MQTT username today,
    /// a client certificate's CN once TLS arrives. `None` for anonymous clients.
    pub identity: Option<String>,
}

/// Why a CONNECT is refused; each maps to a CONNACK code in both protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("bad user name or password")]
    BadCredentials,
    #[error("not authorized")]
    NotAuthorized,
}

/// The per-device policy seam.
pub trait Authorizer: Send + Sync + 'static {
    /// Decides whether a client may connect and who it is.
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        Ok(Principal {
            client_id: connect.client_id.to_string(),
            identity: connect.username.map(str::to_string),
        })
    }

    /// Whether `principal` may publish to `topic`.
    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool;
}

/// Every client may connect and publish anywhere: the local default.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn may_publish(&self, _: &Principal, _: &Topic<'_>) -> bool {
        true
    }
}

/// IoT Core's usual per-thing policy: a client must name itself (its MQTT
/// username) and may publish only to `dt/{any fleet}/{its name}/telemetry`.
/// It checks no password: it is the policy half, for a trusted network or
/// behind an authenticator that checks credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnDeviceOnly;

impl Authorizer for OwnDeviceOnly {
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        match connect.username {
            Some(name) if !name.is_empty() => Ok(Principal {
                client_id: connect.client_id.to_string(),
                identity: Some(name.to_string()),
            }),
            _ => Err(ConnectRefusal::NotAuthorized),
        }
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        principal.identity.as_deref() == Some(topic.device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect<'a>(username: Option<&'a str>) -> ConnectInfo<'a> {
        ConnectInfo {
            client_id: "c1",
            username,
            password: None,
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
}
