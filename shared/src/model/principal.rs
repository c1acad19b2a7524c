//! How principals are named: each kind in a namespace of its own, so an
//! API key's name never meets a token's subject or the service's own names.

/// Names that stand for the service itself, which no key may take.
pub const RESERVED_NAMES: [&str; 4] = ["maintainer", "anonymous", "system", "service"];

/// The principal of an API key named `name`.
pub fn key_principal(name: &str) -> String {
    format!("key:{name}")
}

/// The principal of a bearer token of `issuer` for subject `sub`.
pub fn jwt_principal(issuer: &str, sub: &str) -> String {
    format!("jwt:{issuer}:{sub}")
}
