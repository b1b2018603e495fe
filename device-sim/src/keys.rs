//! Credentials the simulator is given: the server's manufacturing key (to compute each
//! simulated device's default credentials, as a production line would) and user
//! credentials for app clients (as `tether admin user add` prints them).

use std::path::Path;

use anyhow::{bail, Context, Result};
use tether_proto::credentials::{CredentialId, CredentialKind, Credentials};

/// Reads a manufacturing key file: 64 bytes as 128 hex digits (what
/// `tether admin mfg-key generate` writes).
pub fn read_mfg_key(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading manufacturing key {}", path.display()))?;
    parse_hex_key(text.trim()).with_context(|| format!("manufacturing key {}", path.display()))
}

/// Decodes 128 hex digits into 64 bytes.
pub fn parse_hex_key(hex: &str) -> Result<Vec<u8>> {
    if hex.len() != 128 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("a manufacturing key is 128 hex digits");
    }
    (0..64)
        .map(|i| {
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("a manufacturing key is hex")
        })
        .collect()
}

/// Parses one user credential: `u.<user> <secret>` (as `tether admin user add` prints it)
/// or `u.<user>:<secret>`.
pub fn parse_user(s: &str) -> Result<Credentials> {
    let s = s.trim();
    let (id, secret) = s
        .split_once(' ')
        .or_else(|| s.split_once(':'))
        .context("expected `u.<user> <secret>` or `u.<user>:<secret>`")?;
    let c = Credentials {
        id: id.trim().to_string(),
        secret: secret.trim().to_string(),
    };
    match CredentialId::parse(&c.id) {
        Ok(id) if id.kind() == CredentialKind::User => {}
        _ => bail!("`{}` is not a user credential id (u.<user_id>)", c.id),
    }
    tether_proto::credentials::check_secret_shape(CredentialKind::User, &c.secret)
        .with_context(|| format!("the secret of {} is not a user secret", c.id))?;
    Ok(c)
}

/// Reads a users file: one `u.<user> <secret>` per line; blank lines and `#` comments are
/// skipped.
pub fn read_users(path: &Path) -> Result<Vec<Credentials>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading users file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_user)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_in_both_forms() {
        let secret = tether_proto::credentials::user_secret([7; 16]);
        let a = parse_user(&format!("u.alice {secret}")).expect("space form");
        let b = parse_user(&format!("u.alice:{secret}")).expect("colon form");
        assert_eq!(a, b);
        assert!(parse_user(&format!("a.alice {secret}")).is_err());
        assert!(parse_user("u.alice short").is_err());
    }

    #[test]
    fn hex_keys_are_64_bytes() {
        let hex = "ab".repeat(64);
        assert_eq!(parse_hex_key(&hex).expect("key"), vec![0xab; 64]);
        assert!(parse_hex_key("abc").is_err());
    }
}
