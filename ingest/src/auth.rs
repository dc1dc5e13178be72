//! Who may connect, where a connection may publish, and what it may subscribe
//! to.
//!
//! One small trait, called on the connection's own task for every CONNECT,
//! PUBLISH and SUBSCRIBE filter; it must not block (no I/O per call: load
//! policy up front).
//!
//! Here the trait and the policies that need no state ([`AllowAll`],
//! [`OwnDeviceOnly`], [`ClientCertificates`]); `users_file` holds
//! [`UsersFile`], the policy that checks credentials from a file.

use schemas::Topic;

#[cfg(test)]
pub(crate) mod tests;
mod users_file;

pub use users_file::{UsersFile, UsersFileError};

/// What a client presented in its CONNECT, and over TLS.
#[derive(Debug, Clone, Copy)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// The device a client certificate names (see
    /// [`certificate_identity`](crate::tls::certificate_identity)), once the
    /// TLS handshake verified that certificate against the client CA. `None`
    /// over plain TCP, without a certificate, or when it names no device.
    pub certificate: Option<&'a str>,
    /// What that certificate grants besides its device (see
    /// [`certificate_role`](crate::tls::certificate_role)): an operator's
    /// certificate may watch the whole fleet. [`Role::Device`] without one.
    pub certificate_role: Role,
}

/// Who a connection is, as decided at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    /// The identity the policy checks topics against: a verified client
    /// certificate's CN, else the MQTT username. `None` for anonymous clients.
    pub identity: Option<String>,
    pub role: Role,
}

/// What a principal may watch beyond its own device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Subscribes only to filters that match nothing but its own topics.
    #[default]
    Device,
    /// May also subscribe to any filter: the live tap of the whole fleet.
    /// It publishes only as its own device, like any other principal.
    Operator,
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
            identity: connect.certificate.or(connect.username).map(str::to_string),
            role: connect.certificate_role,
        })
    }

    /// Whether `principal` may publish to `topic`.
    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool;

    /// Whether `principal` may subscribe to `filter`, a valid topic filter.
    /// Required, so that no policy grants the fleet's telemetry by default.
    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool;
}

/// Every client may connect, publish anywhere and watch everything: the local
/// default, without authentication.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn may_publish(&self, _: &Principal, _: &Topic<'_>) -> bool {
        true
    }

    fn may_subscribe(&self, _: &Principal, _: &str) -> bool {
        true
    }
}

/// Whether every topic `filter` can match belongs to `device`, that is has
/// the form `dt/{fleet}/{device}/...`:
/// - the first level is `dt`, spelled out;
/// - the fleet level is a fleet or `+`: only `device` may publish under its
///   own id, in any fleet, so `+` there reaches no other device;
/// - the device level is `device` spelled out (never `+` or `#`);
/// - the levels after it are anything, wildcards included.
///
/// So for `B`, `dt/+/B/telemetry` and `dt/f/B/#` pass; `dt/#`, `#`,
/// `dt/f/+/telemetry`, `dt/+/#` and `dt/f/A/telemetry` do not. An identity
/// that is itself a wildcard or holds a `/` matches no filter.
pub fn only_own_topics(filter: &str, device: &str) -> bool {
    let mut levels = filter.split('/');
    levels.next() == Some("dt")
        && levels.next().is_some_and(|fleet| fleet != "#")
        && levels
            .next()
            .is_some_and(|d| d == device && d != "+" && d != "#")
}

/// The subscription policy of every authenticating authorizer: an operator
/// may watch anything, a device only its own topics.
fn may_subscribe_as_device(principal: &Principal, filter: &str) -> bool {
    match (principal.role, principal.identity.as_deref()) {
        (Role::Operator, _) => true,
        (Role::Device, Some(device)) => only_own_topics(filter, device),
        (Role::Device, None) => false,
    }
}

/// IoT Core's usual per-thing policy: a client must name itself, may
/// publish only to `dt/{any fleet}/{its name}/telemetry`, and may subscribe
/// only to filters that match nothing but its own topics
/// ([`only_own_topics`]), unless its certificate makes it an operator. Its
/// name is its
/// client certificate's CN when it has one, else its MQTT username (a
/// username that contradicts the certificate is refused). It checks no
/// password: it is the policy half, for a trusted network or behind an
/// authenticator that checks credentials.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnDeviceOnly;

impl Authorizer for OwnDeviceOnly {
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        let name = match (connect.certificate, connect.username) {
            (Some(cert), _) => certified(cert, connect.username)?,
            (None, Some(name)) if !name.is_empty() => name,
            (None, _) => return Err(ConnectRefusal::NotAuthorized),
        };
        Ok(principal(connect, name))
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        principal.identity.as_deref() == Some(topic.device_id)
    }

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        may_subscribe_as_device(principal, filter)
    }
}

/// Devices prove who they are with a client certificate, and nothing else:
/// a client without one (plain TCP, or TLS with the certificate optional) is
/// refused. The policy is [`OwnDeviceOnly`]'s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientCertificates;

impl Authorizer for ClientCertificates {
    fn authenticate(&self, connect: &ConnectInfo<'_>) -> Result<Principal, ConnectRefusal> {
        let cert = connect.certificate.ok_or(ConnectRefusal::NotAuthorized)?;
        Ok(principal(connect, certified(cert, connect.username)?))
    }

    fn may_publish(&self, principal: &Principal, topic: &Topic<'_>) -> bool {
        OwnDeviceOnly.may_publish(principal, topic)
    }

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        may_subscribe_as_device(principal, filter)
    }
}

/// The device a certificate names, unless the username claims another: a
/// client configured with one device's certificate and another's name is
/// misconfigured, and guessing which it meant would be worse than refusing.
fn certified<'a>(cert: &'a str, username: Option<&str>) -> Result<&'a str, ConnectRefusal> {
    match username {
        Some(name) if !name.is_empty() && name != cert => Err(ConnectRefusal::NotAuthorized),
        _ => Ok(cert),
    }
}

/// The principal a verified certificate makes: its role comes from the
/// certificate too, never from a password.
fn principal(connect: &ConnectInfo<'_>, identity: &str) -> Principal {
    Principal {
        client_id: connect.client_id.to_string(),
        identity: Some(identity.to_string()),
        role: connect.certificate_role,
    }
}
