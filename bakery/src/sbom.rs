//! The image's software bill of materials, as CycloneDX 1.5 JSON: every Debian package
//! installed in the image with its version (and a package URL scanners match against
//! advisories), and the application package with the SHA-256 of each of its files.
//!
//! Written with serde rather than the `cyclonedx-bom` crate: the document is a few plain
//! objects, and that crate would add its own dependency tree to every build for them. The
//! tests validate what this writes against the format's published JSON schema.

use crate::dpkg;
use crate::package::{EntryKind, ManifestEntry};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What the SBOM describes.
pub struct Inputs<'a> {
    pub image_name: &'a str,
    pub app: &'a str,
    pub version: &'a str,
    /// Where the package came from (path or URL) and its SHA-256.
    pub package_source: &'a str,
    pub package_sha256: &'a str,
    pub files: &'a [ManifestEntry],
    pub packages: &'a [dpkg::Package],
    /// Names the document: the same bake always gets the same serial number.
    pub bake_id: &'a str,
    pub timestamp: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bom<'a> {
    bom_format: &'static str,
    spec_version: &'static str,
    serial_number: String,
    version: u32,
    metadata: Metadata<'a>,
    components: Vec<Component>,
    dependencies: Vec<Dependency>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    timestamp: &'a str,
    tools: Tools,
    component: Component,
}

#[derive(Serialize)]
struct Tools {
    components: Vec<Component>,
}

#[derive(Serialize, Default)]
struct Component {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref", skip_serializing_if = "String::is_empty")]
    bom_ref: String,
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    purl: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<Hash>,
    #[serde(rename = "externalReferences", skip_serializing_if = "Vec::is_empty")]
    external_references: Vec<Reference>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    components: Vec<Component>,
}

#[derive(Serialize)]
struct Hash {
    alg: &'static str,
    content: String,
}

#[derive(Serialize)]
struct Reference {
    #[serde(rename = "type")]
    kind: &'static str,
    url: String,
}

#[derive(Serialize)]
struct Dependency {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(rename = "dependsOn")]
    depends_on: Vec<String>,
}

const IMAGE_REF: &str = "image";
const APP_REF: &str = "application";

fn sha256(content: &str) -> Vec<Hash> {
    vec![Hash { alg: "SHA-256", content: content.to_string() }]
}

/// A Debian package's package URL (purl-spec's `deb` type), its version percent-encoded.
pub fn deb_purl(package: &dpkg::Package) -> String {
    let version: String = package
        .version
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' | '_' | '~' => c.to_string(),
            other => format!("%{:02X}", other as u32),
        })
        .collect();
    let mut purl = format!("pkg:deb/debian/{}@{version}?arch={}", package.name, package.architecture);
    if let Some(source) = &package.source {
        purl.push_str(&format!("&upstream={source}"));
    }
    purl
}

/// The SBOM as pretty JSON.
pub fn cyclonedx(inputs: &Inputs) -> Vec<u8> {
    let files = inputs
        .files
        .iter()
        .filter(|entry| entry.kind == EntryKind::File)
        .map(|entry| Component {
            kind: "file",
            bom_ref: format!("file:{}", entry.path),
            name: entry.path.clone(),
            hashes: entry.sha256.as_deref().map(sha256).unwrap_or_default(),
            ..Component::default()
        })
        .collect();
    let application = Component {
        kind: "application",
        bom_ref: APP_REF.to_string(),
        name: inputs.app.to_string(),
        version: inputs.version.to_string(),
        hashes: sha256(inputs.package_sha256),
        external_references: crate::package::is_url(inputs.package_source)
            .then(|| Reference { kind: "distribution", url: inputs.package_source.to_string() })
            .into_iter()
            .collect(),
        components: files,
        ..Component::default()
    };
    let debs: Vec<Component> = inputs
        .packages
        .iter()
        .map(|package| {
            let purl = deb_purl(package);
            Component {
                kind: "library",
                bom_ref: purl.clone(),
                name: package.name.clone(),
                version: package.version.clone(),
                purl: Some(purl),
                ..Component::default()
            }
        })
        .collect();
    let depends_on = std::iter::once(APP_REF.to_string()).chain(debs.iter().map(|d| d.bom_ref.clone())).collect();
    let bom = Bom {
        bom_format: "CycloneDX",
        spec_version: "1.5",
        serial_number: serial_number(inputs.bake_id),
        version: 1,
        metadata: Metadata {
            timestamp: inputs.timestamp,
            tools: Tools {
                components: vec![Component {
                    kind: "application",
                    name: "bakery".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Component::default()
                }],
            },
            component: Component {
                kind: "operating-system",
                bom_ref: IMAGE_REF.to_string(),
                name: inputs.image_name.to_string(),
                version: inputs.version.to_string(),
                ..Component::default()
            },
        },
        components: std::iter::once(application).chain(debs).collect(),
        dependencies: vec![Dependency { reference: IMAGE_REF.to_string(), depends_on }],
    };
    serde_json::to_vec_pretty(&bom).expect("an SBOM serializes")
}

/// A UUID-shaped `urn:uuid:` named by the bake, with the version 4 and variant bits the
/// format's schema asks for.
fn serial_number(bake_id: &str) -> String {
    let mut bytes: [u8; 16] = Sha256::digest(bake_id.as_bytes())[..16].try_into().expect("16 of 32 bytes");
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!("urn:uuid:{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(name: &str, version: &str, source: Option<&str>) -> dpkg::Package {
        dpkg::Package {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            source: source.map(Into::into),
        }
    }

    #[test]
    fn lists_debian_packages_and_the_application_with_its_files() {
        let files = [
            ManifestEntry {
                path: "/opt/app/app.jar".into(),
                kind: EntryKind::File,
                size: 3,
                mode: 0o644,
                sha256: Some("a".repeat(64)),
                target: None,
            },
            ManifestEntry {
                path: "/opt/app".into(),
                kind: EntryKind::Dir,
                size: 0,
                mode: 0o755,
                sha256: None,
                target: None,
            },
        ];
        let packages = [package("zlib1g", "1:1.2.13.dfsg-1", Some("zlib")), package("cron", "3.0pl1-162", None)];
        let json = cyclonedx(&Inputs {
            image_name: "hello-1.0-20261201",
            app: "hello",
            version: "1.0",
            package_source: "https://ci.invalid/job/hello/7/artifact/hello.tar.gz",
            package_sha256: &"b".repeat(64),
            files: &files,
            packages: &packages,
            bake_id: "bake-1",
            timestamp: "2026-12-01T00:00:00Z",
        });
        let bom: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(bom["specVersion"], "1.5");
        let serial = bom["serialNumber"].as_str().unwrap();
        assert_eq!(serial, serial_number("bake-1"));
        assert_eq!(&serial[23..24], "4");
        let app = &bom["components"][0];
        assert_eq!(
            (app["name"].as_str(), app["hashes"][0]["content"].as_str()),
            (Some("hello"), Some(&*"b".repeat(64)))
        );
        assert_eq!(app["externalReferences"][0]["type"], "distribution");
        assert_eq!(app["components"].as_array().unwrap().len(), 1, "files only, not directories");
        assert_eq!(app["components"][0]["name"], "/opt/app/app.jar");
        let zlib = &bom["components"][1];
        assert_eq!(zlib["purl"], "pkg:deb/debian/zlib1g@1%3A1.2.13.dfsg-1?arch=amd64&upstream=zlib");
        assert_eq!(bom["dependencies"][0]["dependsOn"].as_array().unwrap().len(), 3);
    }
}
