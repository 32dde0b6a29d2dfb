//! The HTML report (`--html`): opened in a real browser (Debian's chromium, driven over the
//! DevTools protocol) it loads with no console error and no network request, shows the grid's
//! cells, opens a cell's cases on a click and on the keyboard, narrows them with a filter kept
//! in the URL fragment; and every string from a report stays text, however hostile.
//!
//! Where chromium is not installed the browser test says so and returns, unless
//! PEFT_COMPAT_REQUIRE_BROWSER is set (CI sets it: there a missing browser fails the test).

mod support;

use headless_chrome::protocol::cdp::types::Event;
use headless_chrome::protocol::cdp::Network;
use headless_chrome::{Browser, LaunchOptions, Tab};
use serde_json::Value;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use support::{bin, json, write};

/// The browser to drive: PEFT_COMPAT_CHROMIUM, else `chromium` on the PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PEFT_COMPAT_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    })
}

/// A headless browser, or `None` (with the reason printed) where there is none to drive.
fn browser() -> Option<Browser> {
    let Some(path) = chromium() else {
        let why = "no chromium on the PATH (apt-get install chromium, or set PEFT_COMPAT_CHROMIUM)";
        assert!(
            std::env::var_os("PEFT_COMPAT_REQUIRE_BROWSER").is_none(),
            "PEFT_COMPAT_REQUIRE_BROWSER is set, but {why}"
        );
        eprintln!("skipped: {why}");
        return None;
    };
    // Without the background-networking flags chromium tries to reach its own services.
    let args: Vec<&OsStr> = [
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(OsStr::new)
    .collect();
    Some(
        Browser::new(LaunchOptions {
            path: Some(path),
            headless: true,
            sandbox: false,
            window_size: Some((1400, 1000)),
            args,
            ..LaunchOptions::default()
        })
        .expect("chromium starts"),
    )
}

/// What the page did that it should not: console errors, uncaught exceptions, requests.
struct Watch {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Watch {
    fn on(tab: &Arc<Tab>, page: &str) -> Watch {
        tab.enable_runtime().unwrap();
        tab.enable_log().unwrap();
        tab.call_method(Network::Enable {
            max_total_buffer_size: None,
            max_resource_buffer_size: None,
            max_post_data_size: None,
            report_direct_socket_traffic: None,
            enable_durable_messages: None,
        })
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let page = page.to_string();
        tab.add_event_listener(Arc::new(move |e: &Event| {
            let what = match e {
                Event::RuntimeExceptionThrown(x) => {
                    Some(format!("exception: {:?}", x.params.exception_details.text))
                }
                Event::RuntimeConsoleAPICalled(x) => Some(format!("console.{:?}", x.params.Type)),
                Event::LogEntryAdded(x) => Some(format!("log: {}", x.params.entry.text)),
                // The page itself is loaded from its file; anything else is a request.
                Event::NetworkRequestWillBeSent(x) if !x.params.request.url.starts_with(&page) => {
                    Some(format!("request: {}", x.params.request.url))
                }
                _ => None,
            };
            if let Some(w) = what {
                s.lock().unwrap().push(w);
            }
        }))
        .unwrap();
        Watch { seen }
    }

    fn nothing(&self) {
        let seen = self.seen.lock().unwrap();
        assert!(seen.is_empty(), "the page did what it should not: {seen:?}");
    }
}

fn eval(tab: &Tab, js: &str) -> Value {
    tab.evaluate(js, false)
        .unwrap_or_else(|e| panic!("{js}: {e}"))
        .value
        .unwrap_or(Value::Null)
}

fn open(browser: &Browser, url: &str) -> (Arc<Tab>, Watch) {
    let tab = browser.new_tab().unwrap();
    let page = url.split('#').next().unwrap().to_string();
    let watch = Watch::on(&tab, &page);
    tab.navigate_to(url)
        .unwrap()
        .wait_until_navigated()
        .unwrap();
    (tab, watch)
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.canonicalize().unwrap().display())
}

/// A JSON report of candle's forward cases on a small shape, f32 and f16, with `adapters`.
fn small_report(dir: &Path, adapters: &str) -> PathBuf {
    let m = write(
        dir,
        "m.yaml",
        &format!(
            "seed: 1\naxes: {{backend: [candle], device: [cpu], dtype: [f32, f16], adapter: {adapters}, \
             op: [forward], precision: [native]}}\n\
             shapes: {{s: {{batch: 2, in_features: 8, out_features: 4, rank: 2, alpha: 4}}}}\n"
        ),
    );
    let r = dir.join("r.json");
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["-q", "--results", "/dev/null", "--json"])
        .arg(&r)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    r
}

const DETAIL_ROWS: &str = "document.querySelectorAll('#detail-table tbody tr').length";

/// The default matrix's page: 240 cells (10 rows x 24 columns that ran here: 6 builds x 4 dtypes), a click on the
/// libtorch 2.1.2 fp16 LoRA init cell lists its cases with the `addmm_impl_cpu_` error, a filter
/// narrows them and goes into the URL, the link opens the same view, the keyboard works.
#[test]
fn the_default_page_works_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("default.html");
    let out = bin()
        .args([
            "run",
            "matrices/default.yaml",
            "-q",
            "--results",
            "/dev/null",
            "--html",
        ])
        .arg(&html)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(&html).unwrap().len();
    assert!(size < 3 << 20, "{size} bytes");
    let Some(browser) = browser() else { return };
    let url = file_url(&html);
    let (tab, watch) = open(&browser, &url);

    assert_eq!(
        eval(&tab, "document.querySelectorAll('button.cell').length"),
        240
    );
    assert_eq!(eval(&tab, "document.getElementById('detail').hidden"), true);
    let cell = "button.cell[aria-label^='lora init, tch 2.1.2 cpu f16']";
    tab.find_element(cell).unwrap().click().unwrap();
    assert_eq!(
        eval(&tab, "document.getElementById('detail').hidden"),
        false
    );
    let all = eval(&tab, DETAIL_ROWS).as_u64().unwrap();
    assert!(all >= 2, "{all} cases");
    let text = eval(&tab, "document.getElementById('detail-table').textContent");
    assert!(
        text.as_str()
            .unwrap()
            .contains("\"addmm_impl_cpu_\" not implemented for 'Half'"),
        "{text}"
    );

    // A filter narrows the open cell's cases and the grid, and is kept in the URL.
    eval(
        &tab,
        "var s = document.querySelector('select[data-axis=precision]'); s.value = 'native'; \
         s.dispatchEvent(new Event('change'));",
    );
    let native = eval(&tab, DETAIL_ROWS).as_u64().unwrap();
    assert!(0 < native && native < all, "{native} of {all}");
    let hash = eval(&tab, "location.hash").as_str().unwrap().to_string();
    assert!(
        hash.contains("precision=native") && hash.contains("cell=s0r0c5"),
        "{hash}"
    );
    let dots = "document.querySelectorAll('circle.dot:not(.hidden)').length";
    let shown = eval(&tab, dots).as_u64().unwrap();
    assert!(shown > 0, "dots for native cases");
    watch.nothing();

    // The link shows the same view in a new tab.
    let (again, watch2) = open(&browser, &format!("{url}{hash}"));
    assert_eq!(eval(&again, DETAIL_ROWS).as_u64().unwrap(), native);
    assert_eq!(eval(&again, dots).as_u64().unwrap(), shown);
    assert_eq!(
        eval(
            &again,
            "document.querySelector('select[data-axis=precision]').value"
        ),
        "native"
    );

    // The keyboard: Escape closes the cases, Enter on a focused cell opens them.
    again.press_key("Escape").unwrap();
    assert_eq!(
        eval(&again, "document.getElementById('detail').hidden"),
        true
    );
    eval(&again, "document.querySelector('button.cell').focus()");
    again.press_key("Enter").unwrap();
    assert_eq!(
        eval(&again, "document.getElementById('detail').hidden"),
        false
    );
    watch2.nothing();
}

/// Hostile strings in a report (an error, a reason, a shape name, the matrix name, a label)
/// are text wherever the page shows them: in the markup, in the data and in the browser.
#[test]
fn hostile_strings_stay_text() {
    let dir = tempfile::tempdir().unwrap();
    let r = small_report(dir.path(), "[lora]");
    let evil =
        "</script><script>document.title='owned'</script><img src=x onerror=alert(1)>&amp;\"'";
    let mut report = json(&r);
    report["matrix"] = Value::from(format!("m{evil}.yaml"));
    report["command"] = Value::from(format!("peft-compat run {evil}"));
    for c in report["cases"].as_array_mut().unwrap() {
        c["shape"] = Value::from(format!("s{evil}"));
        c["outcome"] = Value::from("unsupported");
        c["error"] = Value::from(format!("RuntimeError: {evil}"));
        c["expected"] = serde_json::json!({
            "outcome": "unsupported", "reason": format!("because {evil}"),
            "rule": format!("m.yaml:{evil}"), "status": "met"
        });
    }
    let hostile = dir.path().join("hostile.json");
    std::fs::write(&hostile, report.to_string()).unwrap();
    let html = dir.path().join("hostile.html");
    let out = bin()
        .arg("report")
        .arg(&hostile)
        .args(["-q", "--html"])
        .arg(&html)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    // Our two scripts and nothing else; the data block holds no `<` at all.
    assert_eq!(page.matches("<script").count(), 2);
    assert!(!page.contains("<img"), "an element from the data");
    assert!(
        page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "escaped in the markup"
    );
    let data = &page[page.find("type=\"application/json\">").unwrap()..];
    let data = &data[..data.find("</script>").unwrap()];
    assert!(!data[1..].contains('<'), "{data}");

    // The same page in the browser: nothing ran, and the strings read back verbatim.
    let Some(browser) = browser() else { return };
    let (tab, watch) = open(&browser, &file_url(&html));
    assert_eq!(eval(&tab, "document.scripts.length"), 2);
    assert_eq!(eval(&tab, "document.images.length"), 0);
    assert_eq!(
        eval(&tab, "document.title"),
        format!("peft-compat: m{evil}.yaml")
    );
    tab.find_element("button.cell").unwrap().click().unwrap();
    let text = eval(&tab, "document.getElementById('detail-table').textContent");
    let text = text.as_str().unwrap();
    assert!(
        text.contains(&format!("RuntimeError: {evil}"))
            && text.contains(&format!("because {evil}")),
        "{text}"
    );
    assert_eq!(eval(&tab, "document.images.length"), 0);
    let filters = eval(
        &tab,
        "document.querySelector('select[data-axis=shape]').textContent",
    );
    assert!(filters.as_str().unwrap().contains(&format!("s{evil}")));
    watch.nothing();
}

/// `compare --html`: the builds side by side, a differing cell marked with `≠` (not by colour
/// alone), each report's cases a click away.
#[test]
fn the_compare_page_marks_differing_cells() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_report(dir.path(), "[lora, dora]");
    let mut other = json(&a);
    other["cases"][0]["outcome"] = Value::from("crashed");
    other["cases"][0]["error"] = Value::from("signal 11 (SIGSEGV)");
    let b = dir.path().join("b.json");
    std::fs::write(&b, other.to_string()).unwrap();
    let html = dir.path().join("compare.html");
    let out = bin()
        .arg("compare")
        .arg(&a)
        .arg(&b)
        .args(["--label", "before", "--label", "after", "--html"])
        .arg(&html)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("class=\"cell differs\"").count(), 1);
    assert!(page.contains("≠ "));
    let Some(browser) = browser() else { return };
    let (tab, watch) = open(&browser, &file_url(&html));
    tab.find_element("button.cell.differs")
        .unwrap()
        .click()
        .unwrap();
    let text = eval(&tab, "document.getElementById('detail-table').textContent");
    let text = text.as_str().unwrap();
    assert!(
        text.contains("before") && text.contains("after") && text.contains("SIGSEGV"),
        "{text}"
    );
    watch.nothing();
}

/// A figure, not a check: how long a page takes to load and run its script in chromium
/// (`PEFT_COMPAT_HTML_PAGE=out/failures.html cargo test --release --test html -- --ignored
/// --nocapture`).
#[test]
#[ignore]
fn page_load_figures() {
    let page = PathBuf::from(
        std::env::var_os("PEFT_COMPAT_HTML_PAGE").expect("PEFT_COMPAT_HTML_PAGE=path/to/page.html"),
    );
    let Some(browser) = browser() else { return };
    let (tab, watch) = open(&browser, &file_url(&page));
    let ready = eval(
        &tab,
        "(function () { var t = performance.getEntriesByType('navigation')[0]; \
         return JSON.stringify([t.domContentLoadedEventEnd, t.loadEventEnd]); })()",
    );
    let ready: Value = serde_json::from_str(ready.as_str().unwrap()).unwrap();
    eprintln!(
        "{}: {} bytes; DOMContentLoaded (script run) at {:.0} ms, load at {:.0} ms; {} cells, {} dots",
        page.display(),
        std::fs::metadata(&page).unwrap().len(),
        ready[0].as_f64().unwrap_or(f64::NAN),
        ready[1].as_f64().unwrap_or(f64::NAN),
        eval(&tab, "document.querySelectorAll('button.cell').length"),
        eval(&tab, "document.querySelectorAll('circle.dot').length"),
    );
    watch.nothing();
}
