//! Every tag Bakery reads or writes on images, snapshots and volumes, named once. (The
//! launcher's group tags live with the launcher's aws cloud.) Keys starting with `bakery:` are
//! reserved: a recipe or `--tag` cannot set them.

pub const RESERVED_PREFIX: &str = "bakery:";

/// The base image family an image was built as (`debian12-jre17-tomcat10`).
pub const BASE_NAME: &str = "bakery:base-name";
/// On a base from Debian packages: the digest of the suite's Release files it was built from
/// (`unknown` when built offline).
pub const BASE_UPSTREAM: &str = "bakery:base-upstream";
/// On a team's base: the image of the base it extends.
pub const BASE_PARENT: &str = "bakery:base-parent";
/// Hash of the base recipe and builder: the base build cache key.
pub const BASE_RECIPE_HASH: &str = "bakery:base-recipe-hash";
/// Hash of everything a bake's result depends on: equal keys, equal images.
pub const BAKE_KEY: &str = "bakery:bake-key";
/// The bake that made an image, or that owns a volume or snapshot in the cloud.
pub const BAKE_ID: &str = "bakery:bake-id";
pub const VERSION: &str = "bakery:version";
pub const RECIPE: &str = "bakery:recipe";
/// Where one of the image's documents is kept outside it: `bakery:manifest-url`,
/// `bakery:sbom-url`, `bakery:provenance-url` (aws, with `--artifact-bucket`: an `s3://` URL).
pub fn document_url(document: crate::provider::Document) -> String {
    format!("bakery:{}-url", document.as_str())
}

/// SHA-256 of the image's SBOM (`/var/lib/bakery/sbom.cdx.json`), the subject of its provenance.
pub const SBOM_SHA256: &str = "bakery:sbom-sha256";
/// On a pushed image: the local image it came from.
pub const PUSHED_FROM: &str = "bakery:pushed-from";
/// Copies of an image in other regions (`region=ami-…,…`), deleted with it.
pub const COPIES: &str = "bakery:copies";
/// `in-progress` on a snapshot until its image is registered; gc reclaims old ones.
pub const STATUS: &str = "bakery:status";
/// `true` or `false` once `bakery verify` has booted the image.
pub const VERIFIED: &str = "bakery:verified";
pub const VERIFIED_BOOT_MS: &str = "bakery:verified-boot-ms";
