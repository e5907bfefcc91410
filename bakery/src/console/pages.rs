//! The console's pages, rendered on the server from [`super::views`]: plain functions from what
//! is shown to HTML, every value escaped ([`html::escape`]).

use super::actions::{Line, Summary};
use super::html::{self, escape, link, post_form, table, url_part, Header};
use super::views::{registry_counts, Application, ClusterView};
use crate::launch::cloud::{DeployRecord, Group, Health, Outcome};
use crate::provider::{Document, Image};
use crate::tags;
use std::fmt::Write as _;

fn tag<'a>(image: &'a Image, key: &str) -> &'a str {
    image.tags.get(key).map(String::as_str).unwrap_or("")
}

fn image_link(id: &str) -> String {
    link(&format!("/images/{}", url_part(id)), id)
}

fn cluster_link(name: &str) -> String {
    link(&format!("/clusters/{}", url_part(name)), name)
}

pub fn applications(apps: &[Application], header: &Header) -> String {
    let rows = apps.iter().map(|app| {
        let clusters: Vec<String> = app.clusters.iter().map(|c| cluster_link(c)).collect();
        let newest: Vec<String> =
            app.images.iter().map(|i| format!("{} {}", image_link(&i.id), escape(tag(i, "version")))).collect();
        let all = link(&format!("/images?app={}", url_part(&app.name)), &format!("all {}", app.image_count));
        vec![escape(&app.name), clusters.join("<br>"), format!("{}<br>{all}", newest.join("<br>"))]
    });
    let body = table("applications", &["Application", "Clusters", "Newest images"], rows);
    html::page("Applications", header, &body)
}

/// The images table and the filter above it.
pub fn images(list: &[Image], apps: &[String], app: Option<&str>, header: &Header) -> String {
    let mut filter = String::from("<form method=\"get\" action=\"/images\" class=\"filter\"><label>Application <select name=\"app\"><option value=\"\">all</option>");
    for name in apps {
        let selected = if Some(name.as_str()) == app { " selected" } else { "" };
        let _ = write!(filter, "<option value=\"{0}\"{selected}>{0}</option>", escape(name));
    }
    filter.push_str("</select></label> <button type=\"submit\">Show</button></form>");
    let rows = list.iter().map(|i| {
        let build = match (tag(i, "build_job"), tag(i, "build_number")) {
            ("", "") => String::new(),
            (job, number) => format!("{job} #{number}"),
        };
        let verified = match (tag(i, tags::VERIFIED), tag(i, tags::VERIFIED_BOOT_MS)) {
            ("", _) => String::new(),
            (verdict, "") => verdict.to_string(),
            (verdict, ms) => format!("{verdict}, booted in {ms} ms"),
        };
        let sha = tag(i, "package_sha256");
        vec![
            image_link(&i.id),
            escape(tag(i, "app")),
            escape(tag(i, "version")),
            escape(&build),
            escape(tag(i, "commit")),
            escape(tag(i, "base_image_name")),
            format!("<code title=\"{}\">{}</code>", escape(sha), escape(sha.get(..12).unwrap_or(sha))),
            escape(&verified),
            escape(&i.created),
        ]
    });
    let headers = ["Image", "App", "Version", "Build", "Commit", "Base", "Package sha256", "Verified", "Created"];
    let body = format!("{filter}{}", table("images", &headers, rows));
    html::page("Images", header, &body)
}

fn document_link(image: &Image, document: Document, text: &str) -> String {
    link(&format!("/images/{}/{}", url_part(&image.id), document.as_str()), text)
}

pub fn image(image: &Image, header: &Header) -> String {
    let facts = [
        ("Name", escape(&image.name)),
        ("Description", escape(&image.description)),
        ("Snapshot", escape(&image.snapshot_id)),
        ("Size", format!("{} MiB", image.volume_size >> 20)),
        ("Architecture", escape(&image.architecture)),
        ("Created", escape(&image.created)),
        ("Manifest", document_link(image, Document::Manifest, "every file the bake installed")),
    ];
    // A bake that wrote an SBOM (and its provenance) says so in the image's tags.
    let attested = image.tags.contains_key(tags::SBOM_SHA256).then(|| {
        [
            ("SBOM", document_link(image, Document::Sbom, "every Debian package and the app's files (CycloneDX)")),
            ("Provenance", document_link(image, Document::Provenance, "how it was made (in-toto, SLSA)")),
        ]
    });
    let json = ("JSON", link(&format!("/api/images/{}", url_part(&image.id)), "as the API returns it"));
    let facts = facts.into_iter().chain(attested.into_iter().flatten()).chain([json]);
    let facts = table("image", &["", ""], facts.map(|(k, v)| vec![k.to_string(), v]));
    let tags = table("tags", &["Tag", "Value"], image.tags.iter().map(|(k, v)| vec![escape(k), escape(v)]));
    let body = format!("{facts}<h2>Tags</h2>{tags}");
    html::page(&format!("Image {}", image.id), header, &body)
}

fn healthy(group: &Group) -> usize {
    group.members.iter().filter(|m| m.health == Health::Healthy).count()
}

fn record_rows(record: &DeployRecord) -> String {
    let steps = record.steps.iter().map(|s| {
        let outcome = match s.outcome {
            Outcome::Ok => "ok",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
            Outcome::Pending => "pending",
        };
        let note = s.message.as_deref().map(|m| format!(" — {}", escape(m))).unwrap_or_default();
        format!("<li class=\"{outcome}\">{outcome}: {} ({} ms){note}</li>", escape(&s.step), s.duration_ms)
    });
    steps.collect()
}

fn history(records: &[DeployRecord]) -> String {
    let mut out = String::from("<ol id=\"history\">");
    for r in records {
        let image = r.image_id.as_deref().map(|i| format!(" of {}", image_link(i))).unwrap_or_default();
        let why = r.message.as_deref().map(|m| format!(": {}", escape(m))).unwrap_or_default();
        let _ = write!(
            out,
            "<li><details><summary><b>{:?}</b>{image} — {:?}{why}, started {} by {}</summary><ul>{}</ul></details></li>",
            r.action,
            r.phase,
            html::time(r.started),
            escape(r.started_by.as_deref().unwrap_or("unknown")),
            record_rows(r)
        );
    }
    if records.is_empty() {
        out.push_str("<li>none</li>");
    }
    out.push_str("</ol>");
    out
}

pub fn cluster(view: &ClusterView, header: &Header, now: u64) -> String {
    let name = &view.status.cluster;
    let base = format!("/clusters/{}", url_part(name));
    let rows = view.status.groups.iter().rev().map(|g| {
        let counts: Vec<String> = registry_counts(g).iter().map(|(s, n)| format!("{s}: {n}")).collect();
        let c = g.capacity;
        vec![
            link(&format!("{base}/groups/{}", url_part(&g.name)), &g.name),
            escape(view.versions.get(&g.image_id).map(String::as_str).unwrap_or("")),
            image_link(&g.image_id),
            format!("<span class=\"state\">{}</span>", view.state_of(g)),
            format!("{}/{}/{}", c.min, c.desired, c.max),
            format!("{}/{}", healthy(g), g.members.len()),
            escape(&counts.join(", ")),
            html::age(g.created, now),
        ]
    });
    let headers = ["Group", "Version", "Image", "State", "Min/desired/max", "Healthy", "Registry", "Age"];
    let mut body = table("groups", &headers, rows);
    let balancer = match &view.status.balancer_url {
        Some(url) => format!("<a id=\"balancer\" href=\"{0}\">{0}</a>", escape(url)),
        None => "none".into(),
    };
    let _ = write!(body, "<p>Traffic arrives at {balancer} ({}).</p>", escape(view.status.cloud));
    match &view.lock {
        Some(h) => {
            let _ = write!(
                body,
                "<p id=\"lock\">Deploy lock held by {} on {} (pid {}, deploy {}) until {}.</p>",
                escape(&h.owner),
                escape(&h.host),
                h.pid,
                escape(&h.deploy_id),
                html::time(h.expires)
            );
        }
        None => body.push_str("<p id=\"lock\">No deploy holds the cluster.</p>"),
    }
    let _ = write!(body, "<div class=\"actions\"><a class=\"button\" id=\"deploy\" href=\"{base}/deploy\">Deploy…</a>");
    let rollback = "<button type=\"submit\" id=\"rollback\">Roll back…</button>";
    let finish = "<button type=\"submit\" id=\"finish\">Finish…</button>";
    body.push_str(&post_form(&format!("{base}/rollback"), header.csrf, &[], rollback));
    body.push_str(&post_form(&format!("{base}/finish"), header.csrf, &[], finish));
    body.push_str("</div><h2>Deploys</h2>");
    body.push_str(&history(&view.history));
    html::page(&format!("Cluster {name}"), header, &body)
}

pub fn group(view: &ClusterView, group: &Group, header: &Header, now: u64) -> String {
    let rows = group.members.iter().map(|m| {
        let health = match m.health {
            Health::Healthy => "healthy",
            Health::Starting => "starting",
            Health::Unhealthy => "unhealthy",
        };
        vec![
            escape(&m.id),
            escape(&m.zone),
            escape(m.address.as_deref().unwrap_or("")),
            health.to_string(),
            escape(m.registry_status.as_deref().unwrap_or("")),
            m.launched.map(|t| html::age(t, now)).unwrap_or_default(),
        ]
    });
    let c = group.capacity;
    let mut body = format!(
        "<p>{} of cluster {}, image {} ({}), capacity {}/{}/{}, created {}.</p>",
        view.state_of(group),
        link(&format!("/clusters/{}", url_part(&view.status.cluster)), &view.status.cluster),
        image_link(&group.image_id),
        escape(view.versions.get(&group.image_id).map(String::as_str).unwrap_or("version unknown")),
        c.min,
        c.desired,
        c.max,
        html::time(group.created)
    );
    body.push_str(&table("instances", &["Instance", "Zone", "Address", "Health", "Registry", "Uptime"], rows));
    body.push_str("<h2>Replacements</h2>");
    let replaced = group
        .replacements
        .iter()
        .map(|r| vec![html::time(r.at), escape(&r.instance), escape(&r.replaced_by), escape(&r.reason)]);
    body.push_str(&table("replacements", &["When", "Instance", "Replaced by", "Why"], replaced));
    html::page(&format!("Group {}", group.name), header, &body)
}

/// What the deploy form offers, and what it was last given.
pub struct DeployForm<'a> {
    pub cluster: &'a str,
    /// Offer what only aws uses: target groups and the Cloud Map namespace.
    pub aws: bool,
    pub images: &'a [Image],
    pub serving: Option<&'a Group>,
    pub problem: Option<&'a str>,
}

pub fn deploy_form(form: &DeployForm, header: &Header) -> String {
    let mut options = String::new();
    for (index, image) in form.images.iter().enumerate() {
        let selected = if index == 0 { " selected" } else { "" };
        let _ = write!(
            options,
            "<option value=\"{}\"{selected}>{} {} ({})</option>",
            escape(&image.id),
            escape(&image.id),
            escape(tag(image, "version")),
            escape(&image.created)
        );
    }
    let capacity = form.serving.map(|g| g.capacity);
    let number = |name: &str, value: Option<u32>| {
        let value = value.map(|v| v.to_string()).unwrap_or_default();
        format!("<label>{name} <input type=\"number\" min=\"0\" name=\"{name}\" value=\"{value}\" placeholder=\"from the serving group\"></label>")
    };
    let problem = form.problem.map(|p| format!("<p class=\"problem\">{}</p>", escape(p))).unwrap_or_default();
    let fields = format!(
        "{problem}<p><label>Image <select name=\"image\" id=\"image\">{options}</select></label></p>\
         <p><label>Strategy <select name=\"strategy\"><option value=\"red-black\" selected>red-black (the old group kept warm)</option>\
         <option value=\"highlander\">highlander (every other group destroyed)</option></select></label></p>\
         <p>{} {} {}</p>\
         {aws}<p><label>Health URL <input name=\"health_url\" value=\"/\"></label> \
         <label>Health timeout <input name=\"health_timeout\" value=\"10m\"></label> \
         <label>Soak <input name=\"soak\" value=\"\" placeholder=\"none, or e.g. 30m\"></label></p>\
         <p><button type=\"submit\" id=\"review\">Review…</button></p>",
        number("min", capacity.map(|c| c.min)),
        number("desired", capacity.map(|c| c.desired)),
        number("max", capacity.map(|c| c.max)),
        aws = match form.aws {
            true => "<p><label>Target groups <input name=\"target_groups\" size=\"60\" placeholder=\"ARNs, comma-separated; default: the current group's\"></label> \
                     <label>Registry namespace <input name=\"registry_namespace\" placeholder=\"Cloud Map; default: the current group's\"></label></p>",
            false => "",
        },
    );
    let action = format!("/clusters/{}/deploy", url_part(form.cluster));
    let body = post_form(&action, header.csrf, &[], &fields);
    html::page(&format!("Deploy to {}", form.cluster), header, &body)
}

/// A review: the steps the launcher will run, in its own words, and the same request to post
/// again (with the plan's fingerprint among `fields`) to run them.
pub fn confirm(
    title: &str,
    steps: &[String],
    notice: Option<&str>,
    action: &str,
    fields: &[(&str, &str)],
    header: &Header,
) -> String {
    let mut body = notice.map(|n| format!("<p class=\"problem\">{}</p>", escape(n))).unwrap_or_default();
    body.push_str("<p>Confirming runs these steps, in order:</p><ol id=\"changes\">");
    for step in steps {
        let _ = write!(body, "<li>{}</li>", escape(step));
    }
    body.push_str("</ol>");
    body.push_str(&post_form(action, header.csrf, fields, "<button type=\"submit\" id=\"confirm\">Confirm</button>"));
    html::page(title, header, &body)
}

pub fn action(run: &Summary, header: &Header) -> String {
    let mut lines = String::new();
    for Line { event, line, .. } in &run.lines {
        let kind = serde_json::to_value(event).ok().and_then(|v| v["event"].as_str().map(String::from));
        let _ = write!(lines, "<li class=\"{}\">{}</li>", escape(&kind.unwrap_or_default()), escape(line));
    }
    let (state, outcome) = match &run.ending {
        None => ("running", "running…".to_string()),
        Some(e) if e.ok => ("ok", "succeeded".to_string()),
        Some(e) => ("failed", format!("failed: {}", e.error.as_deref().unwrap_or("unknown"))),
    };
    let image = run.image_id.map(|i| format!(" of {}", image_link(i))).unwrap_or_default();
    let body = format!(
        "<p>{}{image} on {}, started {} by {}.</p>\
         <p>Outcome: <span id=\"outcome\" data-state=\"{state}\">{}</span></p>\
         <ol id=\"events\" data-stream=\"/api/actions/{}/events\" data-count=\"{}\">{lines}</ol>",
        escape(run.action),
        cluster_link(run.cluster),
        html::time(run.started),
        escape(run.by),
        escape(&outcome),
        url_part(run.id),
        run.lines.len(),
    );
    html::page(&format!("{} {}", run.action, run.cluster), header, &body)
}

pub fn sign_in(problem: Option<&str>) -> String {
    let problem = problem.map(|p| format!("<p class=\"problem\">{}</p>", escape(p))).unwrap_or_default();
    let header = Header { login: "", csrf: "", signed_in: false, provider: "" };
    let body = format!(
        "{problem}<form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\"></label> \
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form>"
    );
    html::page("Sign in", &header, &body)
}

pub fn problem(status: u16, message: &str, header: &Header) -> String {
    html::page(&format!("{status}"), header, &format!("<p class=\"problem\">{}</p>", escape(message)))
}
