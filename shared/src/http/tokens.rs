//! Page tokens as clients see them: the store's cursor sealed (AES-256-GCM)
//! with the deployment's key and bound to the listing that issued it, so a
//! token is opaque (it shows no job id, of this table or another) and
//! authenticated (a token altered, forged, or issued for another listing is
//! refused).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// Seals and opens page tokens with one key.
pub struct PageTokens {
    key: LessSafeKey,
    random: SystemRandom,
}

impl PageTokens {
    /// Tokens under a key derived from `secret`: every process of a
    /// deployment given the same secret reads the others' tokens.
    pub fn from_secret(secret: &str) -> Self {
        Self::from_key(Sha256::digest(secret.as_bytes()).into())
    }

    /// Tokens under a key of this process alone (a token is then good
    /// until it restarts).
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .expect("the system's random source");
        Self::from_key(key)
    }

    fn from_key(key: [u8; 32]) -> Self {
        let key = UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte AES-256 key");
        Self {
            key: LessSafeKey::new(key),
            random: SystemRandom::new(),
        }
    }

    /// The store's cursor for a listing (`scope` names it: one table's, or
    /// every table's), sealed.
    pub fn seal(&self, scope: &str, cursor: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut sealed = cursor.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(scope.as_bytes()),
                &mut sealed,
            )
            .expect("sealing a page token");
        let mut token = nonce.to_vec();
        token.extend(sealed);
        URL_SAFE_NO_PAD.encode(token)
    }

    /// The cursor a token holds, if this deployment sealed it for `scope`.
    pub fn open(&self, scope: &str, token: &str) -> Option<String> {
        let bytes = URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let cursor = self
            .key
            .open_in_place(nonce, Aad::from(scope.as_bytes()), &mut sealed)
            .ok()?;
        String::from_utf8(cursor.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_opaque_bound_to_their_listing_and_refused_when_altered() {
        let tokens = PageTokens::from_secret("s");
        let cursor = r#"{"c":1,"j":"job-of-another-table"}"#;
        let token = tokens.seal("table:items", cursor);
        assert!(!token.contains("job"), "opaque");
        let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
        assert!(
            !String::from_utf8_lossy(&raw).contains("job-of"),
            "encrypted"
        );
        assert_eq!(tokens.open("table:items", &token).as_deref(), Some(cursor));
        assert_eq!(tokens.open("table:other", &token), None, "another listing");
        assert_eq!(
            PageTokens::from_secret("t").open("table:items", &token),
            None
        );
        let mut altered = raw.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert_eq!(
            tokens.open("table:items", &URL_SAFE_NO_PAD.encode(altered)),
            None
        );
        assert_eq!(tokens.open("table:items", "not a token"), None);
        assert_ne!(
            token,
            tokens.seal("table:items", cursor),
            "a fresh nonce each time"
        );
    }
}
