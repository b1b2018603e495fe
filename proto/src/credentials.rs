//! Device and user credentials (API.md "Credentials", seed 000 FIG 28A–30B): their ids and
//! secrets, the default-secret derivation, and the two wire forms they travel in (HTTP
//! Basic auth and the `X-Tether-Set-Credentials` header).
//!
//! Ids are components joined by `.`, each from `[A-Za-z0-9_-]`:
//! - default (factory) `d.<serial>.<key_id>`, secret `d.` + URL64(HMAC-SHA256(manufacturing
//!   key `key_id`, ASCII(id))), 45 chars;
//! - assigned `a.<serial>`, secret `a.` + URL64(16 random bytes), 24 chars;
//! - user `u.<user_id>`, secret `u.` + URL64(16 random bytes), 24 chars.
//!
//! URL64 is unpadded base64url. Servers store assigned and user secrets only as
//! [`secret_hash`]; every comparison of secret material is constant-time ([`ct_eq`]).
//! Nothing here formats a secret into an error or a `Debug` string.

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;
use core::str::FromStr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The response header that hands a device (or app) a new set of credentials:
/// `X-Tether-Set-Credentials: <id> <secret>`.
pub const SET_CREDENTIALS_HEADER: &str = "X-Tether-Set-Credentials";

/// The longest `Authorization` or `X-Tether-Set-Credentials` value accepted, in bytes.
pub const MAX_HEADER_LEN: usize = 512;

/// The longest serial, manufacturing key id or user id, in bytes.
pub const MAX_COMPONENT_LEN: usize = 64;

/// Length of a default secret: `d.` + 43 URL64 characters (32 bytes).
pub const DEFAULT_SECRET_LEN: usize = 45;

/// Length of an assigned or user secret: `a.`/`u.` + 22 URL64 characters (16 bytes).
pub const RANDOM_SECRET_LEN: usize = 24;

/// The longest id: `d.` + serial + `.` + key id.
const MAX_ID_LEN: usize = 2 + MAX_COMPONENT_LEN + 1 + MAX_COMPONENT_LEN;

/// SHA-256's block size: HMAC keys are hashed down to or zero-padded up to this.
const HMAC_BLOCK: usize = 64;

/// Why a credential string was rejected. No variant carries the rejected text, so an error
/// that reaches a log can never leak a secret (a client may swap id and secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The id is not `d.<serial>.<key_id>`, `a.<serial>` or `u.<user_id>` with valid
    /// components.
    #[error("malformed credential id: {0}")]
    InvalidId(&'static str),
    /// The secret does not have the prefix, length and alphabet of its kind.
    #[error("credential secret has the wrong form for its kind")]
    InvalidSecret,
    /// The `Authorization` value is not `Basic base64(id:secret)`.
    #[error("malformed Basic authorization: {0}")]
    MalformedBasic(&'static str),
    /// The `X-Tether-Set-Credentials` value is not `<id> <secret>`.
    #[error("malformed {SET_CREDENTIALS_HEADER} value")]
    MalformedSetCredentials,
    /// The header value is longer than [`MAX_HEADER_LEN`].
    #[error("credential header longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
}

/// The three kinds of credentials, told apart by the id's first component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// Factory credentials derived from a manufacturing key (`d.`); register only.
    Default,
    /// Credentials the server issued to a device (`a.`).
    Assigned,
    /// A user's (app's) credentials (`u.`).
    User,
}

impl CredentialKind {
    /// The scheme component that starts ids and secrets of this kind (`d`, `a`, `u`).
    pub fn scheme(self) -> &'static str {
        match self {
            CredentialKind::Default => "d",
            CredentialKind::Assigned => "a",
            CredentialKind::User => "u",
        }
    }

    /// The exact length of a secret of this kind.
    pub fn secret_len(self) -> usize {
        match self {
            CredentialKind::Default => DEFAULT_SECRET_LEN,
            CredentialKind::Assigned | CredentialKind::User => RANDOM_SECRET_LEN,
        }
    }
}

/// A parsed, validated credential id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CredentialId {
    /// `d.<serial>.<key_id>`: a device's factory credentials.
    Default {
        /// The device serial (a valid bucket set key).
        serial: String,
        /// Names the manufacturing key the secret was derived with.
        key_id: String,
    },
    /// `a.<serial>`: credentials the server assigned to a device.
    Assigned {
        /// The device serial (a valid bucket set key).
        serial: String,
    },
    /// `u.<user_id>`: a user's credentials.
    User {
        /// The user's id.
        user_id: String,
    },
}

/// A component is 1–64 characters of `[A-Za-z0-9_-]` (so never `.` or `:`). A serial obeys
/// the same rule as [`crate::SetKey`], which it becomes.
fn component_ok(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_COMPONENT_LEN
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl CredentialId {
    /// Parses and validates an id under API.md's component rules.
    pub fn parse(s: &str) -> Result<Self, CredentialError> {
        if s.len() > MAX_ID_LEN {
            return Err(CredentialError::InvalidId("too long"));
        }
        let mut parts = s.split('.');
        let scheme = parts.next().unwrap_or_default();
        let first = parts.next();
        let second = parts.next();
        if parts.next().is_some() {
            return Err(CredentialError::InvalidId("too many components"));
        }
        let checked = |c: Option<&str>| match c {
            Some(c) if component_ok(c) => Ok(c.to_string()),
            Some(_) => Err(CredentialError::InvalidId(
                "components are 1-64 characters of [A-Za-z0-9_-]",
            )),
            None => Err(CredentialError::InvalidId("too few components")),
        };
        let no_more = |c: Option<&str>| match c {
            None => Ok(()),
            Some(_) => Err(CredentialError::InvalidId("too many components")),
        };
        match scheme {
            "d" => Ok(CredentialId::Default {
                serial: checked(first)?,
                key_id: checked(second)?,
            }),
            "a" => {
                no_more(second)?;
                Ok(CredentialId::Assigned {
                    serial: checked(first)?,
                })
            }
            "u" => {
                no_more(second)?;
                Ok(CredentialId::User {
                    user_id: checked(first)?,
                })
            }
            _ => Err(CredentialError::InvalidId(
                "unknown scheme (expected d, a or u)",
            )),
        }
    }

    /// The device serial for device credentials; `None` for a user.
    pub fn serial(&self) -> Option<&str> {
        match self {
            CredentialId::Default { serial, .. } | CredentialId::Assigned { serial } => {
                Some(serial)
            }
            CredentialId::User { .. } => None,
        }
    }

    /// Which kind of credentials this id names.
    pub fn kind(&self) -> CredentialKind {
        match self {
            CredentialId::Default { .. } => CredentialKind::Default,
            CredentialId::Assigned { .. } => CredentialKind::Assigned,
            CredentialId::User { .. } => CredentialKind::User,
        }
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialId::Default { serial, key_id } => write!(f, "d.{serial}.{key_id}"),
            CredentialId::Assigned { serial } => write!(f, "a.{serial}"),
            CredentialId::User { user_id } => write!(f, "u.{user_id}"),
        }
    }
}

impl FromStr for CredentialId {
    type Err = CredentialError;
    fn from_str(s: &str) -> Result<Self, CredentialError> {
        CredentialId::parse(s)
    }
}

/// An id and its secret. `Debug` shows the id only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The credential id (the Basic auth user name).
    pub id: String,
    /// The secret (the Basic auth password).
    pub secret: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An id that contains the secret (a mix-up such as the secret pasted as the id, or
        // a forged pair) would show it: then the id is withheld too (crash-674e603f).
        let id: &dyn fmt::Debug = if !self.secret.is_empty() && self.id.contains(&self.secret) {
            &"<redacted>"
        } else {
            &self.id
        };
        f.debug_struct("Credentials")
            .field("id", id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Parses the id (the secret is not looked at).
    pub fn parsed_id(&self) -> Result<CredentialId, CredentialError> {
        CredentialId::parse(&self.id)
    }
}

fn url64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// HMAC-SHA256 (RFC 2104). Normalising the key to one block first — hashed when longer,
/// zero-padded when shorter, exactly what HMAC itself does — makes construction infallible.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; HMAC_BLOCK];
    if key.len() > HMAC_BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The default secret of `id`: `d.` + URL64(HMAC-SHA256(mfg_key, ASCII(id))), 45 chars.
/// Computed over `id` as given; callers validate it with [`CredentialId::parse`].
pub fn default_secret(mfg_key: &[u8], id: &str) -> String {
    format!("d.{}", url64(&hmac_sha256(mfg_key, id.as_bytes())))
}

/// A device's full default credentials for `serial` under manufacturing key `key_id`, as
/// a production line would inject them.
pub fn default_credentials(
    mfg_key: &[u8],
    serial: &str,
    key_id: &str,
) -> Result<Credentials, CredentialError> {
    let id = CredentialId::Default {
        serial: serial.to_string(),
        key_id: key_id.to_string(),
    }
    .to_string();
    // Re-parse: validates both components with the one set of rules.
    CredentialId::parse(&id)?;
    let secret = default_secret(mfg_key, &id);
    Ok(Credentials { id, secret })
}

/// Whether `presented_secret` is the default secret of `id` under `mfg_key`. `id` must be
/// a valid default id; the comparison is constant-time.
pub fn verify_default(mfg_key: &[u8], id: &str, presented_secret: &str) -> bool {
    let is_default = matches!(CredentialId::parse(id), Ok(CredentialId::Default { .. }));
    let expected = default_secret(mfg_key, id);
    is_default & ct_eq(expected.as_bytes(), presented_secret.as_bytes())
}

/// An assigned secret from 16 random bytes: `a.` + URL64, 24 chars.
pub fn assigned_secret(random: [u8; 16]) -> String {
    format!("a.{}", url64(&random))
}

/// A user secret from 16 random bytes: `u.` + URL64, 24 chars.
pub fn user_secret(random: [u8; 16]) -> String {
    format!("u.{}", url64(&random))
}

/// SHA-256 of the secret string: all a server stores of an assigned or user secret.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time equality (for equal lengths; a length difference answers at once).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Checks that `secret` looks like a secret of `kind`: its scheme prefix, exact length,
/// and a canonical URL64 body (alphabet `[A-Za-z0-9_-]`, unused trailing bits zero).
pub fn check_secret_shape(kind: CredentialKind, secret: &str) -> Result<(), CredentialError> {
    let body = secret
        .strip_prefix(kind.scheme())
        .and_then(|s| s.strip_prefix('.'))
        .ok_or(CredentialError::InvalidSecret)?;
    if secret.len() != kind.secret_len()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(CredentialError::InvalidSecret);
    }
    let mut buf = [0u8; 48];
    URL_SAFE_NO_PAD
        .decode_slice(body, &mut buf)
        .map(|_| ())
        .map_err(|_| CredentialError::InvalidSecret)
}

/// Parses an id and a secret and checks they fit together.
fn checked_pair(id: &str, secret: &str) -> Result<Credentials, CredentialError> {
    let parsed = CredentialId::parse(id)?;
    check_secret_shape(parsed.kind(), secret)?;
    Ok(Credentials {
        id: id.to_string(),
        secret: secret.to_string(),
    })
}

/// Parses an `Authorization` value: `Basic <base64(id:secret)>`, the scheme
/// case-insensitive, standard base64 with padding. The id must be valid, the secret must
/// have its kind's shape ([`check_secret_shape`]: a secret of another shape could never
/// verify), and there is exactly one `:`. Values over [`MAX_HEADER_LEN`] bytes are refused
/// before decoding.
pub fn parse_basic(header_value: &str) -> Result<Credentials, CredentialError> {
    if header_value.len() > MAX_HEADER_LEN {
        return Err(CredentialError::TooLong);
    }
    let (scheme, rest) = header_value
        .trim_matches(|c| c == ' ' || c == '\t')
        .split_once(' ')
        .ok_or(CredentialError::MalformedBasic("expected `Basic <base64>`"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(CredentialError::MalformedBasic("scheme is not Basic"));
    }
    let decoded = STANDARD
        .decode(rest.trim_start_matches(' '))
        .map_err(|_| CredentialError::MalformedBasic("invalid base64"))?;
    let text =
        core::str::from_utf8(&decoded).map_err(|_| CredentialError::MalformedBasic("not UTF-8"))?;
    let (id, secret) = text.split_once(':').ok_or(CredentialError::MalformedBasic(
        "no `:` between id and secret",
    ))?;
    if secret.contains(':') {
        return Err(CredentialError::MalformedBasic("more than one `:`"));
    }
    checked_pair(id, secret)
}

/// The `Authorization` value for `c`: `Basic base64(id:secret)`.
pub fn basic_header(c: &Credentials) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", c.id, c.secret))
    )
}

/// Parses an `X-Tether-Set-Credentials` value: `<id> <secret>`, one space between, the
/// id valid and the secret of its kind's shape.
pub fn parse_set_credentials(value: &str) -> Result<Credentials, CredentialError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(CredentialError::TooLong);
    }
    let (id, secret) = value
        .trim_matches(|c| c == ' ' || c == '\t')
        .split_once(' ')
        .ok_or(CredentialError::MalformedSetCredentials)?;
    checked_pair(id, secret).map_err(|_| CredentialError::MalformedSetCredentials)
}

/// The `X-Tether-Set-Credentials` value for `c`: `<id> <secret>`.
pub fn format_set_credentials(c: &Credentials) -> String {
    format!("{} {}", c.id, c.secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    const ZERO_KEY: [u8; 64] = [0; 64];

    fn seq_key(n: u8) -> Vec<u8> {
        (0..n).collect()
    }

    // Computed independently with Python's standard library:
    //
    //     import hmac, hashlib, base64
    //     keys = {"zero64": bytes(64), "seq64": bytes(range(64)), "seq100": bytes(range(100))}
    //     for name, k in keys.items():
    //         for i in ["d.01AA02AB.k1", "d.SN-0000_42.line-7", "d.Z.0"]:
    //             mac = hmac.new(k, i.encode("ascii"), hashlib.sha256).digest()
    //             print(name, i, "d." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    //
    // seq100 is longer than SHA-256's block and exercises HMAC's key-hashing path.
    const VECTORS: [(&str, &str, &str); 9] = [
        (
            "zero64",
            "d.01AA02AB.k1",
            "d.Sra7Ia_uz70eA2aUeVM9UVb_NEEmJDq7fidlwx1RPVU",
        ),
        (
            "zero64",
            "d.SN-0000_42.line-7",
            "d.EzqCsNb6OHQXGaVcbPfAzo5zT3qFQMNsZyZduG6xMmg",
        ),
        (
            "zero64",
            "d.Z.0",
            "d.JdHU2oLlLyp6Rbhdrf0PAPTkN4p78xqf-LPm69RCGNg",
        ),
        (
            "seq64",
            "d.01AA02AB.k1",
            "d.2QZ5V1FZyWbvF6gFenHfxGLpmd0NbfmrfP-PHNauECM",
        ),
        (
            "seq64",
            "d.SN-0000_42.line-7",
            "d.Vo5TYz2dVbd4_mIHbQu25cAtGZipj_cNdc7RP36mgec",
        ),
        (
            "seq64",
            "d.Z.0",
            "d.PWV5BEqol5aBMqWySpD3RUq3MtpNGXikGXLKXw-WWUs",
        ),
        (
            "seq100",
            "d.01AA02AB.k1",
            "d.Yvd-xOfmCQM9qHWoA9YSa7Vm1_GElIJNd7n2tSHnjMU",
        ),
        (
            "seq100",
            "d.SN-0000_42.line-7",
            "d.kl-jGec7BtcZmC9T8-toH3eTVj8lO3Ne0o-2EuTKTa0",
        ),
        (
            "seq100",
            "d.Z.0",
            "d.K3e_7to_S0F7BYfiYMoQ6IegwsTloA6qdx3JBNFxYmU",
        ),
    ];

    fn key(name: &str) -> Vec<u8> {
        match name {
            "zero64" => ZERO_KEY.to_vec(),
            "seq64" => seq_key(64),
            "seq100" => seq_key(100),
            other => unreachable!("no key {other}"),
        }
    }

    #[test]
    fn default_secrets_match_python_hmac_vectors() {
        for (k, id, expected) in VECTORS {
            let key = key(k);
            let secret = default_secret(&key, id);
            assert_eq!(secret, expected, "{k} {id}");
            assert_eq!(secret.len(), DEFAULT_SECRET_LEN);
            assert!(verify_default(&key, id, expected), "{k} {id}");
            assert_eq!(check_secret_shape(CredentialKind::Default, &secret), Ok(()));
        }
    }

    #[test]
    fn verify_default_rejects_wrong_key_wrong_id_and_tampering() {
        let (_, id, good) = VECTORS[3];
        let key = seq_key(64);
        assert!(!verify_default(&ZERO_KEY, id, good), "other key");
        assert!(!verify_default(&key, "d.01AA02AB.k2", good), "other id");
        assert!(!verify_default(&key, id, &good[..44]), "truncated");
        assert!(!verify_default(&key, id, ""), "empty");
        let mut flipped = good.as_bytes().to_vec();
        flipped[10] ^= 1;
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert!(!verify_default(&key, id, &flipped), "one bit");
        // Not a default id, even if someone derived a "secret" for it.
        let a_secret = default_secret(&key, "a.01AA02AB");
        assert!(!verify_default(&key, "a.01AA02AB", &a_secret));
    }

    #[test]
    fn default_credentials_builds_and_validates() {
        let c = default_credentials(&ZERO_KEY, "01AA02AB", "k1").expect("valid");
        assert_eq!(c.id, "d.01AA02AB.k1");
        assert_eq!(c.secret, VECTORS[0].2);
        assert!(default_credentials(&ZERO_KEY, "01AA.02AB", "k1").is_err());
        assert!(default_credentials(&ZERO_KEY, "01AA02AB", "").is_err());
    }

    #[test]
    fn random_secrets_have_their_shape() {
        let bytes: [u8; 16] = core::array::from_fn(|i| i as u8);
        // base64.urlsafe_b64encode(bytes(range(16))).rstrip(b"=")
        assert_eq!(assigned_secret(bytes), "a.AAECAwQFBgcICQoLDA0ODw");
        assert_eq!(user_secret(bytes), "u.AAECAwQFBgcICQoLDA0ODw");
        assert_eq!(assigned_secret([0xff; 16]), "a._____________________w");
        for s in [assigned_secret([0xff; 16]), assigned_secret([0; 16])] {
            assert_eq!(s.len(), RANDOM_SECRET_LEN);
            assert_eq!(check_secret_shape(CredentialKind::Assigned, &s), Ok(()));
            assert!(check_secret_shape(CredentialKind::User, &s).is_err());
        }
    }

    #[test]
    fn secret_hash_is_sha256_of_the_string() {
        // hashlib.sha256(b"a.AAECAwQFBgcICQoLDA0ODw").hexdigest()
        let expected = "3dc78a2b3732e530376c3e192e302b5d55ef7f9be42015e53fed1b1fbc1e4b2c";
        let hex: String = secret_hash("a.AAECAwQFBgcICQoLDA0ODw")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn ct_eq_compares_contents_and_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn secret_shapes() {
        use CredentialKind::*;
        let ok = [
            (Assigned, "a.AAECAwQFBgcICQoLDA0ODw"),
            (User, "u.AAECAwQFBgcICQoLDA0ODw"),
            (Default, VECTORS[0].2),
        ];
        for (kind, s) in ok {
            assert_eq!(check_secret_shape(kind, s), Ok(()), "{s}");
        }
        let bad = [
            (Assigned, ""),
            (Assigned, "a."),
            (Assigned, "a.AAECAwQFBgcICQoLDA0OD"),   // short
            (Assigned, "a.AAECAwQFBgcICQoLDA0ODwA"), // long
            (Assigned, "a.AAECAwQFBgcICQoLDA0OD+"),  // standard alphabet
            (Assigned, "a.AAECAwQFBgcICQoLDA0OD="),  // padding
            (Assigned, "a.AAECAwQFBgcICQoLDA0ODx"),  // non-zero trailing bits
            (Assigned, "u.AAECAwQFBgcICQoLDA0ODw"),  // other kind's prefix
            (Assigned, "aXAAECAwQFBgcICQoLDA0ODw"),  // no dot
            (Assigned, "a.AAECAwQFBgcICQoLDA0OD\u{e9}"), // non-ASCII
            (Default, "d.AAECAwQFBgcICQoLDA0ODw"),
        ];
        for (kind, s) in bad {
            assert_eq!(
                check_secret_shape(kind, s),
                Err(CredentialError::InvalidSecret),
                "{s:?}"
            );
        }
    }

    #[test]
    fn credential_id_table() {
        let long = "x".repeat(64);
        let too_long = "x".repeat(65);
        let valid: [(&str, CredentialId); 6] = [
            (
                "d.01AA02AB.k1",
                CredentialId::Default {
                    serial: "01AA02AB".into(),
                    key_id: "k1".into(),
                },
            ),
            (
                "a.01AA02AB",
                CredentialId::Assigned {
                    serial: "01AA02AB".into(),
                },
            ),
            (
                "u.alice",
                CredentialId::User {
                    user_id: "alice".into(),
                },
            ),
            (
                "u.A-b_9",
                CredentialId::User {
                    user_id: "A-b_9".into(),
                },
            ),
            (
                &*format!("d.{long}.{long}"),
                CredentialId::Default {
                    serial: long.clone(),
                    key_id: long.clone(),
                },
            ),
            (
                &*format!("a.{long}"),
                CredentialId::Assigned {
                    serial: long.clone(),
                },
            ),
        ];
        for (s, id) in valid {
            assert_eq!(CredentialId::parse(s).as_ref(), Ok(&id), "{s}");
            assert_eq!(id.to_string(), s);
        }
        let invalid = [
            "",
            "d",
            "d.",
            "d.01AA02AB",
            "d.01AA02AB.",
            "d..k1",
            "d.01AA02AB.k1.x",
            "a",
            "a.",
            "a.01AA02AB.k1",
            "u.",
            "u.a.b",
            "x.01AA02AB",
            "D.01AA02AB.k1",
            "A.01AA02AB",
            "a.01AA:02AB",
            "a.01AA 02AB",
            "a.01AA/02AB",
            "a.01AA02AB\n",
            " a.01AA02AB",
            "a.\u{e9}",
            &format!("a.{too_long}"),
            &format!("u.{too_long}"),
            &format!("d.{too_long}.k1"),
            &format!("d.k.{too_long}"),
            &"a".repeat(10_000),
        ];
        for s in invalid {
            assert!(CredentialId::parse(s).is_err(), "{s:?} should be invalid");
        }
    }

    #[test]
    fn id_accessors() {
        let d = CredentialId::parse("d.S1.k").expect("valid");
        assert_eq!(
            (d.serial(), d.kind()),
            (Some("S1"), CredentialKind::Default)
        );
        let a = CredentialId::parse("a.S1").expect("valid");
        assert_eq!(
            (a.serial(), a.kind()),
            (Some("S1"), CredentialKind::Assigned)
        );
        let u = CredentialId::parse("u.bob").expect("valid");
        assert_eq!((u.serial(), u.kind()), (None, CredentialKind::User));
        assert_eq!("u.bob".parse::<CredentialId>(), Ok(u));
    }

    fn assigned() -> Credentials {
        Credentials {
            id: "a.01AA02AB".into(),
            secret: "a.AAECAwQFBgcICQoLDA0ODw".into(),
        }
    }

    #[test]
    fn basic_header_roundtrips_and_matches_python() {
        let c = assigned();
        // base64.b64encode(b"a.01AA02AB:a.AAECAwQFBgcICQoLDA0ODw")
        let h = basic_header(&c);
        assert_eq!(h, "Basic YS4wMUFBMDJBQjphLkFBRUNBd1FGQmdjSUNRb0xEQTBPRHc=");
        assert_eq!(parse_basic(&h), Ok(c.clone()));
        for variant in [
            "basic YS4wMUFBMDJBQjphLkFBRUNBd1FGQmdjSUNRb0xEQTBPRHc=",
            "BASIC YS4wMUFBMDJBQjphLkFBRUNBd1FGQmdjSUNRb0xEQTBPRHc=",
            "Basic   YS4wMUFBMDJBQjphLkFBRUNBd1FGQmdjSUNRb0xEQTBPRHc=",
            " Basic YS4wMUFBMDJBQjphLkFBRUNBd1FGQmdjSUNRb0xEQTBPRHc= ",
        ] {
            assert_eq!(parse_basic(variant), Ok(c.clone()), "{variant:?}");
        }
    }

    #[test]
    fn basic_header_table_of_rejections() {
        let enc = |s: &str| format!("Basic {}", STANDARD.encode(s));
        let secret = "a.AAECAwQFBgcICQoLDA0ODw";
        let cases: [(String, CredentialError); 14] = [
            (
                format!("Bearer {}", STANDARD.encode(format!("a.X:{secret}"))),
                CredentialError::MalformedBasic("scheme is not Basic"),
            ),
            (
                "Basic".into(),
                CredentialError::MalformedBasic("expected `Basic <base64>`"),
            ),
            (
                "".into(),
                CredentialError::MalformedBasic("expected `Basic <base64>`"),
            ),
            (
                "Basic !!!!".into(),
                CredentialError::MalformedBasic("invalid base64"),
            ),
            (
                // unpadded
                "Basic YS4wMUFBMDJBQjphLkFBRUNBd1FGQmdjSUNRb0xEQTBPRHc".into(),
                CredentialError::MalformedBasic("invalid base64"),
            ),
            (
                // URL-safe alphabet
                format!(
                    "Basic {}",
                    URL_SAFE_NO_PAD.encode("a.X:a.____________________")
                ),
                CredentialError::MalformedBasic("invalid base64"),
            ),
            (
                "Basic ".into(),
                CredentialError::MalformedBasic("expected `Basic <base64>`"),
            ),
            (
                "Basic  =".into(),
                CredentialError::MalformedBasic("invalid base64"),
            ),
            (
                format!("Basic {}", STANDARD.encode([0xff, b':', b'x'])),
                CredentialError::MalformedBasic("not UTF-8"),
            ),
            (
                enc("a.01AA02AB"),
                CredentialError::MalformedBasic("no `:` between id and secret"),
            ),
            (enc("a.01AA02AB:"), CredentialError::InvalidSecret),
            (
                enc(&format!("a.01AA02AB:{secret}:x")),
                CredentialError::MalformedBasic("more than one `:`"),
            ),
            (
                enc(&format!("x.01AA02AB:{secret}")),
                CredentialError::InvalidId("unknown scheme (expected d, a or u)"),
            ),
            (
                format!("Basic {}", "A".repeat(MAX_HEADER_LEN)),
                CredentialError::TooLong,
            ),
        ];
        for (h, err) in cases {
            assert_eq!(parse_basic(&h), Err(err), "{h:?}");
        }
        // A secret of the wrong kind for its id.
        assert_eq!(
            parse_basic(&enc("u.bob:a.AAECAwQFBgcICQoLDA0ODw")),
            Err(CredentialError::InvalidSecret)
        );
    }

    #[test]
    fn set_credentials_roundtrip_and_rejections() {
        let c = assigned();
        let v = format_set_credentials(&c);
        assert_eq!(v, "a.01AA02AB a.AAECAwQFBgcICQoLDA0ODw");
        assert_eq!(parse_set_credentials(&v), Ok(c));
        for bad in [
            "",
            "a.01AA02AB",
            "a.01AA02AB ",
            "a.01AA02AB  a.AAECAwQFBgcICQoLDA0ODw",
            "a.01AA02AB a.AAECAwQFBgcICQoLDA0ODw x",
            "a.01AA02AB:a.AAECAwQFBgcICQoLDA0ODw",
            "a.01AA02AB u.AAECAwQFBgcICQoLDA0ODw",
            "b.01AA02AB a.AAECAwQFBgcICQoLDA0ODw",
        ] {
            assert_eq!(
                parse_set_credentials(bad),
                Err(CredentialError::MalformedSetCredentials),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_set_credentials(&"a".repeat(MAX_HEADER_LEN + 1)),
            Err(CredentialError::TooLong)
        );
    }

    #[test]
    fn debug_redacts_the_secret() {
        let c = assigned();
        let dbg = format!("{c:?} {c:#?}");
        assert!(dbg.contains("a.01AA02AB"));
        assert!(!dbg.contains(&c.secret), "{dbg}");
    }

    #[test]
    fn errors_never_echo_their_input() {
        let secret = "a.AAECAwQFBgcICQoLDA0ODw";
        for h in [
            // An id that is not one (a client that put its secret in the wrong place).
            format!(
                "Basic {}",
                STANDARD.encode(format!("{secret}.x.y:{secret}"))
            ),
            format!("{secret}.x.y {secret}"),
            // A secret that is not one.
            format!("Basic {}", STANDARD.encode(format!("a.X:{secret}AAEC"))),
            format!("a.X {secret}AAEC"),
        ] {
            let e1 = parse_basic(&h).expect_err("invalid");
            let e2 = parse_set_credentials(&h).expect_err("invalid");
            for e in [e1, e2] {
                assert!(!format!("{e} {e:?}").contains("AAEC"), "{e:?}");
            }
        }
    }

    /// proto/fuzz basic_auth crash-84ae899c: the fuzzer fed an error's own message back
    /// as the header, tripping the harness's "the error does not contain the input" check.
    /// Not a parser fault; the property that matters is that messages are fixed texts.
    #[test]
    fn fuzz_crash_84ae899c_error_messages_are_fixed_texts() {
        let own_message = "malformed Basic authorization: scheme is not Basic";
        let e = parse_basic(own_message).expect_err("not a Basic header");
        assert_eq!(e, CredentialError::MalformedBasic("scheme is not Basic"));
        assert_eq!(e.to_string(), own_message);
        let e2 = parse_basic("Digest something-else entirely").expect_err("not Basic");
        assert_eq!(e2.to_string(), own_message, "same text whatever the input");
    }

    /// proto/fuzz basic_auth crash-674e603f: a forged header whose secret is a prefix of
    /// its id (`a.CAE__AA__W_________ODwE__AB` / `a.CAE__AA__W_________ODw`) showed the
    /// secret through the id in `Debug`.
    #[test]
    fn fuzz_crash_674e603f_debug_hides_a_secret_inside_the_id() {
        let c = parse_basic(&format!(
            "Basic {}",
            STANDARD.encode("a.CAE__AA__W_________ODwE__AB:a.CAE__AA__W_________ODw")
        ))
        .expect("a well-formed pair");
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains(&c.secret), "{shown}");
        // The secret pasted as the id, too.
        let swapped = Credentials {
            id: "a.AAECAwQFBgcICQoLDA0ODw".into(),
            secret: "a.AAECAwQFBgcICQoLDA0ODw".into(),
        };
        assert!(!format!("{swapped:?}").contains("AAEC"));
        // An ordinary set still shows its id.
        assert!(format!("{:?}", assigned()).contains("a.01AA02AB"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn component() -> impl Strategy<Value = String> {
            "[A-Za-z0-9_-]{1,64}"
        }

        fn id() -> impl Strategy<Value = CredentialId> {
            prop_oneof![
                (component(), component())
                    .prop_map(|(serial, key_id)| CredentialId::Default { serial, key_id }),
                component().prop_map(|serial| CredentialId::Assigned { serial }),
                component().prop_map(|user_id| CredentialId::User { user_id }),
            ]
        }

        proptest! {
            #[test]
            fn id_format_then_parse_roundtrips(id in id()) {
                prop_assert_eq!(CredentialId::parse(&id.to_string()), Ok(id));
            }

            #[test]
            fn parse_then_format_is_identity(s in "[adux.]{0,3}[A-Za-z0-9_.:-]{0,80}") {
                if let Ok(id) = CredentialId::parse(&s) {
                    prop_assert_eq!(id.to_string(), s);
                }
            }

            #[test]
            fn basic_and_set_credentials_roundtrip(id in id(), random in any::<[u8; 16]>(), key in any::<[u8; 8]>()) {
                let secret = match id.kind() {
                    CredentialKind::Default => default_secret(&key, &id.to_string()),
                    CredentialKind::Assigned => assigned_secret(random),
                    CredentialKind::User => user_secret(random),
                };
                let c = Credentials { id: id.to_string(), secret };
                prop_assert_eq!(parse_basic(&basic_header(&c)), Ok(c.clone()));
                prop_assert_eq!(parse_set_credentials(&format_set_credentials(&c)), Ok(c.clone()));
                let shown = format!("{c:?}");
                prop_assert!(!shown.contains(&c.secret));
            }

            #[test]
            fn parsers_never_panic(s in any::<String>()) {
                let _ = CredentialId::parse(&s);
                let _ = parse_basic(&s);
                let _ = parse_set_credentials(&s);
                let _ = parse_basic(&format!("Basic {}", STANDARD.encode(&s)));
                for kind in [CredentialKind::Default, CredentialKind::Assigned, CredentialKind::User] {
                    let _ = check_secret_shape(kind, &s);
                }
            }

            #[test]
            fn debug_never_shows_the_secret(id in "[a-z0-9_.-]{0,40}", secret in "[a-z0-9_.-]{16,40}") {
                let id = format!("{id}{secret}{id}");
                let c = Credentials { id, secret: secret.clone() };
                let shown = format!("{c:?}");
                prop_assert!(!shown.contains(&secret));
            }
        }
    }
}
