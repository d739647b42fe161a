//! The server's ed25519 signing key.

use ruma::signatures::{Ed25519KeyPair, KeyPair, Signature};

/// The key the server signs its events (and later its requests) with.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    der: Vec<u8>,
}

impl SigningKey {
    /// A new random key with the given version (the part after `ed25519:`).
    pub fn generate(version: &str) -> Result<Self, String> {
        let der = Ed25519KeyPair::generate();
        Self::from_der(der.to_vec(), version)
    }

    /// A key from its PKCS#8 DER form, as [`SigningKey::der`] gives it.
    pub fn from_der(der: Vec<u8>, version: &str) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_der(&der, version.to_owned()).map_err(|e| e.to_string())?;
        Ok(SigningKey { pair, der })
    }

    /// The key's ID, e.g. `ed25519:a_BcDe`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.pair.version())
    }

    pub fn version(&self) -> &str {
        self.pair.version()
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.pair.public_key()
    }

    pub fn pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }
}

impl KeyPair for SigningKey {
    fn sign(&self, message: &[u8]) -> Signature {
        self.pair.sign(message)
    }
}
