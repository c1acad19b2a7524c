//! A function's pickle, manifest and code archives beside the table (under
//! the main branch's `_backfill/`, content-addressed), and loading them
//! back for a runtime, checked against the function's identity.

use std::sync::Arc;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use lance::Dataset;
use object_store::path::Path;
use sha2::{Digest, Sha256};

use crate::model::binding::{Binding, Declared, Payload};
use crate::model::error::Error;
use crate::ports::udf::UdfRef;

fn main_location(dataset: &Dataset) -> anyhow::Result<(Path, String)> {
    let main = dataset
        .branch_location()
        .find_main()
        .context("locating the table's main branch")?;
    Ok((main.path, main.uri))
}

fn zip_path(digest: &str) -> String {
    format!("_backfill/udfs/{digest}.zip")
}

fn join(base: &Path, relative: &str) -> Path {
    relative
        .split('/')
        .filter(|part| !part.is_empty())
        .fold(base.clone(), |path, part| path.join(part))
}

/// Writes what a declaration keeps beside the table: a pickle or manifest
/// too large for the binding, and the code archives.
pub async fn store(dataset: &Dataset, declared: &Declared) -> anyhow::Result<()> {
    let store = dataset.object_store(None).await?;
    let (base, _) = main_location(dataset)?;
    if let Payload::Path(relative) = &declared.binding.payload {
        store
            .put(&join(&base, relative), &declared.pickle)
            .await
            .context("keeping the function's pickle beside the table")?;
    }
    if let (Some(relative), Some(manifest)) = (&declared.binding.manifest_path, &declared.manifest)
    {
        store
            .put(&join(&base, relative), manifest.as_bytes())
            .await
            .context("keeping the function's manifest beside the table")?;
    }
    for (zip, digest) in declared
        .workspace_zips
        .iter()
        .zip(&declared.binding.workspace_zips)
    {
        store
            .put(&join(&base, &zip_path(digest)), zip)
            .await
            .context("keeping the function's code beside the table")?;
    }
    Ok(())
}

/// The function of a binding, with its pickle, ready for a runtime. A
/// pickle that is not the one the binding names can never run (permanent);
/// one that cannot be read now may be later (transient).
pub async fn load(dataset: &Dataset, binding: &Binding) -> Result<UdfRef, Error> {
    let unreadable = |err: anyhow::Error| Error::transient(format!("{err:#}"));
    let store = dataset
        .object_store(None)
        .await
        .map_err(|e| unreadable(e.into()))?;
    let (base, _) = main_location(dataset).map_err(unreadable)?;
    let pickle = match &binding.payload {
        Payload::Inline(text) => BASE64
            .decode(text)
            .map_err(|err| Error::Permanent(format!("the inline pickle: {err}")))?,
        Payload::Path(relative) => store
            .read_one_all(&join(&base, relative))
            .await
            .context("reading the function's pickle")
            .map_err(unreadable)?
            .to_vec(),
    };
    let actual = hex::encode(Sha256::digest(&pickle));
    if actual != binding.udf_id {
        return Err(Error::Permanent(format!(
            "the function's pickle changed: its SHA-256 is {actual}, the binding names {}",
            binding.udf_id
        )));
    }
    let manifest = match &binding.manifest_path {
        None => binding.manifest.clone(),
        Some(relative) => {
            let bytes = store
                .read_one_all(&join(&base, relative))
                .await
                .context("reading the function's manifest")
                .map_err(unreadable)?;
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let mut workspace_zips = Vec::new();
    for digest in &binding.workspace_zips {
        let bytes = store
            .read_one_all(&join(&base, &zip_path(digest)))
            .await
            .context("reading the function's code")
            .map_err(unreadable)?;
        workspace_zips.push(BASE64.encode(bytes));
    }
    Ok(UdfRef {
        id: binding.udf_id.clone(),
        name: binding.udf_name.clone(),
        outputs: serde_json::to_value(&binding.outputs).unwrap_or_default(),
        pickle: Arc::new(pickle),
        workspace_zips,
        principal: String::new(),
        wants: crate::model::binding::Wants::of(manifest.as_deref()),
    })
}
