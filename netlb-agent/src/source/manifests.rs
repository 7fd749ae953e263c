//! Manifest-directory source: Service and EndpointSlice objects from YAML or
//! JSON files, parsed with the k8s-openapi types.

use std::{
    fmt,
    hash::{Hash as _, Hasher as _},
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize as _;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read manifest file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An object that could not be used, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    pub file: PathBuf,
    /// Document index within the file (0-based).
    pub index: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} document {}: {} {}/{}: {}",
            self.file.display(),
            self.index,
            if self.kind.is_empty() {
                "object"
            } else {
                &self.kind
            },
            self.namespace,
            self.name,
            self.message
        )
    }
}

/// Everything read from a directory.
#[derive(Clone, Debug, Default)]
pub struct ManifestSnapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub errors: Vec<ObjectError>,
    /// Documents of other kinds (Deployments, ...), ignored.
    pub skipped: usize,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// A cheap change detector: names, sizes and modification times.
pub fn fingerprint(dir: &Path) -> Result<u64, ManifestError> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in manifest_files(dir)? {
        file.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(&file) {
            meta.len().hash(&mut hasher);
            if let Ok(modified) = meta.modified() {
                modified.hash(&mut hasher);
            }
        }
    }
    Ok(hasher.finish())
}

fn field(value: &serde_json::Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Reads every manifest file of `dir`. A document that does not parse is
/// recorded in `errors`; the others still load.
pub fn load_dir(dir: &Path) -> Result<ManifestSnapshot, ManifestError> {
    let mut snapshot = ManifestSnapshot::default();
    for file in manifest_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::ReadFile {
            path: file.clone(),
            source,
        })?;
        load_text(&file, &text, &mut snapshot);
    }
    Ok(snapshot)
}

/// Parses one file's text (YAML, possibly multi-document; JSON is YAML).
pub fn load_text(file: &Path, text: &str, snapshot: &mut ManifestSnapshot) {
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_json::Value::deserialize(document) {
            Ok(serde_json::Value::Null) => continue, // empty document
            Ok(value) => value,
            Err(e) => {
                snapshot.errors.push(ObjectError {
                    file: file.to_owned(),
                    index,
                    kind: String::new(),
                    namespace: String::new(),
                    name: String::new(),
                    message: format!("not valid YAML: {e}"),
                });
                // A syntax error ends the stream: later documents are lost.
                break;
            }
        };
        add_object(file, index, value, snapshot);
    }
}

fn add_object(
    file: &Path,
    index: usize,
    value: serde_json::Value,
    snapshot: &mut ManifestSnapshot,
) {
    let api_version = field(&value, "/apiVersion");
    let kind = field(&value, "/kind");
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = value.get("items").and_then(|i| i.as_array()) {
            for item in items {
                add_object(file, index, item.clone(), snapshot);
            }
        }
        return;
    }
    let error = |message: String| ObjectError {
        file: file.to_owned(),
        index,
        kind: kind.clone(),
        namespace: field(&value, "/metadata/namespace"),
        name: field(&value, "/metadata/name"),
        message,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => match serde_json::from_value::<Service>(value.clone()) {
            Ok(mut svc) => {
                svc.metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                snapshot.services.push(svc);
            }
            Err(e) => snapshot.errors.push(error(e.to_string())),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(value.clone()) {
                Ok(mut slice) => {
                    slice
                        .metadata
                        .namespace
                        .get_or_insert_with(|| "default".into());
                    snapshot.endpoint_slices.push(slice);
                }
                Err(e) => snapshot.errors.push(error(e.to_string())),
            }
        }
        _ => snapshot.skipped += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> ManifestSnapshot {
        let mut s = ManifestSnapshot::default();
        load_text(Path::new("test.yaml"), text, &mut s);
        s
    }

    #[test]
    fn kubernetes_docs_service_and_slice() {
        let s = load(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 9376
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: my-service-abc12
  labels:
    kubernetes.io/service-name: my-service
addressType: IPv4
ports:
  - name: ""
    protocol: TCP
    port: 9376
endpoints:
  - addresses: ["10.244.0.11"]
    conditions: {ready: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
"#,
        );
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(s.endpoint_slices.len(), 1);
        assert_eq!(s.skipped, 1);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }

    #[test]
    fn lists_and_bad_documents() {
        let s = load(
            r#"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: a, namespace: ns1}
    spec: {ports: [{port: 80}]}
  - apiVersion: v1
    kind: Service
    metadata: {name: b}
    spec: {ports: "not a list"}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: 10.96.0.3, ports: [{port: 53, protocol: UDP}]}
"#,
        );
        let names: Vec<_> = s
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].name, "b");
        assert!(
            s.errors[0].to_string().contains("Service /b"),
            "{}",
            s.errors[0]
        );
    }

    #[test]
    fn directory_errors_and_fingerprint() {
        let dir = std::env::temp_dir().join(format!("netlb-manifests-{}", std::process::id()));
        assert!(matches!(load_dir(&dir), Err(ManifestError::ReadDir { .. })));
        std::fs::create_dir_all(&dir).unwrap();
        let before = fingerprint(&dir).unwrap();
        std::fs::write(
            dir.join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let after = fingerprint(&dir).unwrap();
        assert_ne!(before, after);
        assert_eq!(load_dir(&dir).unwrap().services.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
