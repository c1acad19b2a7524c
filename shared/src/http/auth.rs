//! Who is calling: API keys (stored as SHA-256 digests, compared in
//! constant time) and OAuth2 bearer tokens verified as JWTs (signature,
//! `exp`, issuer, audience) against configured keys.

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
use lance_namespace_reqwest_client::models::Identity;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::http::ApiError;
use crate::model::policy::Access;
use crate::model::principal::{RESERVED_NAMES, jwt_principal, key_principal};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Who is calling, in a namespace of its kind so that no two kinds
    /// meet: `key:<name>` for an API key, `jwt:<issuer>:<sub>` for a
    /// bearer token (`anonymous` when the API is open). Recorded on jobs as
    /// the submitter; what the policy names.
    pub subject: String,
}

#[derive(Clone)]
struct StoredKey {
    name: String,
    digest: [u8; 32],
}

#[derive(Clone)]
struct JwtKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

#[derive(Clone)]
pub struct JwtConfig {
    issuer: String,
    audience: String,
    keys: Vec<JwtKey>,
}

#[derive(Clone, Default)]
pub struct Authenticator {
    keys: Vec<StoredKey>,
    jwt: Option<JwtConfig>,
    /// No credentials needed (local runs with --insecure-no-auth only).
    open: bool,
    /// What each principal may do (open when no policy is configured).
    access: Access,
}

/// Whether the headers carry credentials (then the body's are not read).
pub fn has_credentials(headers: &HeaderMap) -> bool {
    ["x-api-key", "authorization"].iter().any(|name| {
        headers
            .get(*name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| !v.trim().is_empty())
    })
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Authenticator {
    /// Accepts every request; only for a local runner the user opened up.
    pub fn open() -> Self {
        Self {
            open: true,
            ..Self::default()
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Decides what each principal may do from now on.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    pub fn has_credentials(&self) -> bool {
        !self.keys.is_empty() || self.jwt.is_some()
    }

    /// Adds a plain API key (hashed at once; the plain text is not kept).
    pub fn with_plain_key(mut self, key: &str) -> Self {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.keys.push(StoredKey {
            name: hex::encode(digest)[..8].to_string(),
            digest,
        });
        self
    }

    /// Adds a stored key: `name:sha256hex` or just the hex digest.
    pub fn with_key_digest(mut self, entry: &str) -> Result<Self, String> {
        let (name, digest_hex) = match entry.split_once(':') {
            Some((name, digest)) => (name.trim().to_string(), digest),
            None => (entry.get(..8).unwrap_or(entry).to_string(), entry),
        };
        if RESERVED_NAMES.contains(&name.as_str()) || name.is_empty() {
            return Err(format!(
                "API key name '{name}' is reserved (or empty): name keys after who holds them"
            ));
        }
        let bytes =
            hex::decode(digest_hex.trim()).map_err(|e| format!("API key digest '{name}': {e}"))?;
        let digest: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("API key digest '{name}' is not 32 bytes of SHA-256"))?;
        self.keys.push(StoredKey { name, digest });
        Ok(self)
    }

    /// Verifies JWTs with a shared secret (HS256), a PEM public key (RS256
    /// or ES256) and/or a JWKS document.
    pub fn with_jwt(
        mut self,
        issuer: &str,
        audience: &str,
        secret: Option<&str>,
        public_key_pem: Option<&str>,
        jwks_json: Option<&str>,
    ) -> Result<Self, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            keys.push(JwtKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(pem) = public_key_pem.filter(|s| !s.is_empty()) {
            if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                keys.push(JwtKey {
                    kid: None,
                    algorithm: Algorithm::RS256,
                    key,
                });
            } else {
                let key = DecodingKey::from_ec_pem(pem.as_bytes())
                    .map_err(|e| format!("JWT public key is neither RSA nor EC PEM: {e}"))?;
                keys.push(JwtKey {
                    kid: None,
                    algorithm: Algorithm::ES256,
                    key,
                });
            }
        }
        if let Some(jwks) = jwks_json.filter(|s| !s.is_empty()) {
            let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("JWKS: {e}"))?;
            for jwk in &set.keys {
                let algorithm = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                    .unwrap_or(Algorithm::RS256);
                keys.push(JwtKey {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key: DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key: {e}"))?,
                });
            }
        }
        if keys.is_empty() {
            return Err("JWT issuer and audience are set but no verification key is".into());
        }
        self.jwt = Some(JwtConfig {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            keys,
        });
        Ok(self)
    }

    /// Checks the request's credentials: headers first, then the body's
    /// `identity`. None at all is 401 (code 16); a wrong one is 403 (code 15).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        identity: Option<&Identity>,
    ) -> Result<Principal, ApiError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let bearer = header("authorization").and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        let api_key = header("x-api-key").or_else(|| {
            identity
                .and_then(|i| i.api_key.as_deref())
                .filter(|k| !k.is_empty())
        });
        let token = bearer.or_else(|| {
            identity
                .and_then(|i| i.auth_token.as_deref())
                .filter(|t| !t.is_empty())
        });

        if self.open {
            return Ok(Principal {
                subject: "anonymous".to_string(),
            });
        }
        if let Some(key) = api_key {
            return self.check_key(key);
        }
        if let Some(token) = token {
            return self.check_token(token);
        }
        if header("authorization").is_some() {
            return Err(ApiError::unauthenticated(
                "the Authorization header must be 'Bearer <token>'",
            ));
        }
        Err(ApiError::unauthenticated(
            "credentials are required: an 'x-api-key' or 'Authorization: Bearer' header, or 'identity' in the body",
        ))
    }

    fn check_key(&self, key: &str) -> Result<Principal, ApiError> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Look at every stored key so timing does not reveal which matched.
        let mut found: Option<&StoredKey> = None;
        for stored in &self.keys {
            if bool::from(stored.digest.ct_eq(&presented)) {
                found = Some(stored);
            }
        }
        found
            .map(|stored| Principal {
                subject: key_principal(&stored.name),
            })
            .ok_or_else(|| ApiError::permission_denied("the API key is not valid"))
    }

    fn check_token(&self, token: &str) -> Result<Principal, ApiError> {
        let Some(jwt) = &self.jwt else {
            return Err(ApiError::permission_denied(
                "bearer tokens are not accepted by this deployment",
            ));
        };
        let header = decode_header(token).map_err(|e| {
            ApiError::permission_denied(format!("the bearer token is not a valid JWT: {e}"))
        })?;
        let mut last_error = String::from("no key matches the token");
        for key in jwt.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && (k.kid.is_none() || header.kid.is_none() || k.kid == header.kid)
        }) {
            let mut validation = Validation::new(key.algorithm);
            validation.set_issuer(&[&jwt.issuer]);
            validation.set_audience(&[&jwt.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.leeway = 30;
            match decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => {
                    let Some(sub) = data.claims.get("sub").and_then(|s| s.as_str()) else {
                        return Err(ApiError::permission_denied(
                            "the bearer token names no subject ('sub')",
                        ));
                    };
                    return Ok(Principal {
                        subject: jwt_principal(&jwt.issuer, sub),
                    });
                }
                Err(err) => last_error = err.to_string(),
            }
        }
        Err(ApiError::permission_denied(format!(
            "the bearer token was rejected: {last_error}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn token(secret: &str, iss: &str, aud: &str, exp_offset: i64) -> String {
        let claims = serde_json::json!({
            "sub": "alice", "iss": iss, "aud": aud,
            "exp": chrono::Utc::now().timestamp() + exp_offset,
        });
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn auth() -> Authenticator {
        Authenticator::default()
            .with_plain_key("k1")
            .with_key_digest(&format!("ops:{}", sha256_hex("k2")))
            .unwrap()
            .with_jwt("https://issuer", "backfill", Some("s3cret"), None, None)
            .unwrap()
    }

    #[test]
    fn keys_in_header_or_body() {
        let auth = auth();
        assert_eq!(
            auth.authenticate(&headers(&[("x-api-key", "k2")]), None)
                .unwrap()
                .subject,
            "key:ops"
        );
        let identity = Identity {
            api_key: Some("k1".into()),
            auth_token: None,
        };
        assert!(
            auth.authenticate(&HeaderMap::new(), Some(&identity))
                .is_ok()
        );
        let err = auth
            .authenticate(&headers(&[("x-api-key", "nope")]), None)
            .unwrap_err();
        assert_eq!((err.status.as_u16(), err.code.as_u32()), (403, 15));
        let err = auth.authenticate(&HeaderMap::new(), None).unwrap_err();
        assert_eq!((err.status.as_u16(), err.code.as_u32()), (401, 16));
    }

    #[test]
    fn principals_are_namespaced_and_reserved_names_refused() {
        let auth = auth();
        let key = auth
            .authenticate(&headers(&[("x-api-key", "k2")]), None)
            .unwrap();
        assert_eq!(key.subject, "key:ops");
        let plain = auth
            .authenticate(&headers(&[("x-api-key", "k1")]), None)
            .unwrap();
        assert_eq!(plain.subject, format!("key:{}", &sha256_hex("k1")[..8]));
        for reserved in ["maintainer", "anonymous", "system"] {
            let entry = format!("{reserved}:{}", sha256_hex("k3"));
            assert!(Authenticator::default().with_key_digest(&entry).is_err());
        }
    }

    #[test]
    fn jwt_matrix() {
        let auth = auth();
        let good = token("s3cret", "https://issuer", "backfill", 600);
        let principal = auth
            .authenticate(
                &headers(&[("authorization", &format!("Bearer {good}"))]),
                None,
            )
            .unwrap();
        assert_eq!(principal.subject, "jwt:https://issuer:alice");
        let identity = Identity {
            api_key: None,
            auth_token: Some(good),
        };
        assert!(
            auth.authenticate(&HeaderMap::new(), Some(&identity))
                .is_ok()
        );
        for bad in [
            token("other", "https://issuer", "backfill", 600),
            token("s3cret", "https://issuer", "backfill", -600),
            token("s3cret", "https://issuer", "someone-else", 600),
            token("s3cret", "https://evil", "backfill", 600),
            "not-a-jwt".to_string(),
        ] {
            let err = auth
                .authenticate(
                    &headers(&[("authorization", &format!("Bearer {bad}"))]),
                    None,
                )
                .unwrap_err();
            assert_eq!((err.status.as_u16(), err.code.as_u32()), (403, 15), "{bad}");
        }
        let err = auth
            .authenticate(&headers(&[("authorization", "Basic abc")]), None)
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 401);
    }
}
