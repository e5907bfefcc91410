//! How an image was made, as an in-toto statement with a SLSA provenance v1 predicate: the
//! base image and its snapshot, the package and its SHA-256, the recipe and its hash, the
//! bakery version, and the CI build (job, number, commit) that asked for the bake. Its
//! subject is the image's SBOM, whose digest the image is tagged with, so the statement, the
//! SBOM and the image name each other.

use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Identifies what a bake's parameters mean; a new major version when they change.
pub const BUILD_TYPE: &str = "urn:bakery:bake:v1";

pub struct Inputs<'a> {
    pub image_name: &'a str,
    pub sbom_sha256: &'a str,
    pub app: &'a str,
    pub version: &'a str,
    pub package: &'a str,
    pub package_sha256: &'a str,
    pub recipe_path: &'a str,
    /// SHA-256 of the merged recipe as it affects the image (its canonical JSON).
    pub recipe_sha256: &'a str,
    pub base_image_id: &'a str,
    pub base_image_name: &'a str,
    pub base_snapshot_id: &'a str,
    pub bake_id: &'a str,
    pub bake_key: &'a str,
    pub provider: &'a str,
    /// The image's tags: the CI build's `build_job`, `build_number` and `commit` come from them.
    pub tags: &'a BTreeMap<String, String>,
    pub started: &'a str,
    pub finished: &'a str,
}

/// The statement as pretty JSON.
pub fn statement(inputs: &Inputs) -> Vec<u8> {
    let build: BTreeMap<&str, &str> = ["build_job", "build_number", "commit"]
        .into_iter()
        .filter_map(|key| inputs.tags.get(key).map(|value| (key, value.as_str())))
        .collect();
    let mut dependencies = vec![
        json!({
            "uri": inputs.package,
            "digest": { "sha256": inputs.package_sha256 },
        }),
        json!({
            "uri": format!("bakery-image:{}", inputs.base_image_id),
            "name": inputs.base_image_name,
            "annotations": { "snapshot_id": inputs.base_snapshot_id },
        }),
        json!({
            "uri": inputs.recipe_path,
            "digest": { "sha256": inputs.recipe_sha256 },
        }),
    ];
    if let Some(commit) = build.get("commit") {
        dependencies.push(json!({ "uri": "source", "digest": { "gitCommit": commit } }));
    }
    let statement: Value = json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": inputs.image_name, "digest": { "sha256": inputs.sbom_sha256 } }],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "app": inputs.app,
                    "version": inputs.version,
                    "package": inputs.package,
                    "recipe": inputs.recipe_path,
                    "build": build,
                },
                "internalParameters": { "provider": inputs.provider, "bake_key": inputs.bake_key },
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": { "id": "urn:bakery", "version": { "bakery": env!("CARGO_PKG_VERSION") } },
                "metadata": {
                    "invocationId": inputs.bake_id,
                    "startedOn": inputs.started,
                    "finishedOn": inputs.finished,
                },
            },
        },
    });
    serde_json::to_vec_pretty(&statement).expect("a statement serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_input_and_the_sbom_as_subject() {
        let tags = BTreeMap::from([
            ("build_job".to_string(), "hello-build".to_string()),
            ("commit".to_string(), "0123abc".to_string()),
            ("app".to_string(), "hello".to_string()),
        ]);
        let json = statement(&Inputs {
            image_name: "hello-1.0",
            sbom_sha256: "s",
            app: "hello",
            version: "1.0",
            package: "/tmp/hello.tar.gz",
            package_sha256: "p",
            recipe_path: "recipes/hello.toml",
            recipe_sha256: "r",
            base_image_id: "ami-1",
            base_image_name: "debian12",
            base_snapshot_id: "snap-1",
            bake_id: "bake-1",
            bake_key: "k",
            provider: "local",
            tags: &tags,
            started: "2026-12-01T00:00:00Z",
            finished: "2026-12-01T00:01:00Z",
        });
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["subject"][0]["digest"]["sha256"], "s");
        let definition = &value["predicate"]["buildDefinition"];
        assert_eq!(definition["externalParameters"]["build"], json!({"build_job": "hello-build", "commit": "0123abc"}));
        let dependencies = definition["resolvedDependencies"].as_array().unwrap();
        assert_eq!(dependencies.len(), 4);
        assert_eq!(dependencies[0]["digest"]["sha256"], "p");
        assert_eq!(dependencies[1]["annotations"]["snapshot_id"], "snap-1");
        assert_eq!(dependencies[3]["digest"]["gitCommit"], "0123abc");
        assert_eq!(value["predicate"]["runDetails"]["metadata"]["invocationId"], "bake-1");
    }
}
