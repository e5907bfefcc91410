//! An image's documents (manifest, SBOM, provenance) in S3, where a user can fetch them: with
//! `--artifact-bucket`, each goes to `s3://BUCKET/bakery/images/IMAGE/FILE` when the image is
//! registered, the image is tagged with each one's URL (`bakery:sbom-url`, …), and deleting the
//! image deletes them. Reading one follows the image's tag, so any bakery can fetch them.

use super::retry::{retry, Policy};
use crate::provider::{Document, Image, Result};
use aws_sdk_s3::primitives::ByteStream;
use std::collections::BTreeMap;

#[derive(Clone)]
pub struct Artifacts {
    pub client: aws_sdk_s3::Client,
    pub policy: Policy,
    /// Where new images' documents go; None keeps them only inside the image.
    pub bucket: Option<String>,
}

/// `s3://bucket/key` as (bucket, key).
fn parse_url(url: &str) -> Option<(&str, &str)> {
    url.strip_prefix("s3://")?.split_once('/')
}

impl Artifacts {
    /// Uploads the documents of image `image_id`; returns the tags that link them. On failure,
    /// what was uploaded is deleted again.
    pub async fn put(
        &self,
        image_id: &str,
        documents: &BTreeMap<Document, Vec<u8>>,
    ) -> Result<BTreeMap<String, String>> {
        let Some(bucket) = &self.bucket else { return Ok(BTreeMap::new()) };
        let mut links = BTreeMap::new();
        for (document, content) in documents {
            let file = document.image_path().rsplit('/').next().expect("a path has a file name");
            let key = format!("bakery/images/{image_id}/{file}");
            let put = retry(self.policy, "PutObject", || {
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .content_type("application/json")
                    .body(ByteStream::from(content.clone()))
                    .send()
            })
            .await;
            if let Err(error) = put {
                self.delete(image_id, &links).await;
                return Err(format!("storing the {} of {image_id} in s3://{bucket}: {error}", document.as_str()).into());
            }
            links.insert(crate::tags::document_url(*document), format!("s3://{bucket}/{key}"));
        }
        Ok(links)
    }

    /// The document an image's tag links, None when it has no such tag.
    pub async fn get(&self, image: &Image, document: Document) -> Result<Option<Vec<u8>>> {
        let Some(url) = image.tags.get(&crate::tags::document_url(document)) else { return Ok(None) };
        let (bucket, key) =
            parse_url(url).ok_or_else(|| format!("image {} links {url}, not an s3:// URL", image.id))?;
        let object =
            retry(self.policy, "GetObject", || self.client.get_object().bucket(bucket).key(key).send()).await?;
        let body = object.body.collect().await.map_err(|e| format!("reading {url}: {e}"))?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// Deletes the documents of image `image_id` its tags link (copies in other regions link
    /// the original's: those stay until the original goes); an object already gone is fine.
    pub async fn delete(&self, image_id: &str, tags: &BTreeMap<String, String>) {
        let own = format!("bakery/images/{image_id}/");
        for document in Document::ALL {
            let link = tags.get(&crate::tags::document_url(document)).and_then(|url| parse_url(url));
            let Some((bucket, key)) = link.filter(|(_, key)| key.starts_with(&own)) else { continue };
            let deleted =
                retry(self.policy, "DeleteObject", || self.client.delete_object().bucket(bucket).key(key).send());
            if let Err(error) = deleted.await {
                tracing::error!(bucket, key, %error, "could not delete an image's document");
            }
        }
    }
}
