//! Headless Chromium (Debian's `chromium`) loading a page: the DOM after load
//! (`--dump-dom`) and a screenshot. Run in the test's network namespace, so it reaches the
//! agent's metrics listener on loopback there.

use std::{
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use super::{patience, wait_until_every};

/// How long one page load may take (a cold start of Chromium is 1-2 s on the host).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Chromium<'a> {
    /// Chromium's profile directory (it writes one even headless).
    profile: &'a Path,
}

impl<'a> Chromium<'a> {
    pub fn new(profile: &'a Path) -> Self {
        Self { profile }
    }

    /// The DOM of `url` once loaded, serialized as HTML.
    pub fn dom(&self, url: &str) -> String {
        self.run(url, &["--dump-dom"])
    }

    /// A PNG of `url` once loaded, `width`×`height` CSS pixels, written to `png`.
    pub fn screenshot(&self, url: &str, png: &Path, (width, height): (u32, u32)) {
        let _ = std::fs::remove_file(png);
        self.run(
            url,
            &[
                &format!("--screenshot={}", png.display()),
                &format!("--window-size={width},{height}"),
                "--hide-scrollbars",
            ],
        );
    }

    fn run(&self, url: &str, args: &[&str]) -> String {
        let out_file = self.profile.with_extension("out");
        let err_file = self.profile.with_extension("err");
        // NB: --no-sandbox: Chromium refuses to run as root with its sandbox.
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_file).expect("chromium's stdout file"))
            .stderr(std::fs::File::create(&err_file).expect("chromium's stderr file"))
            .spawn()
            .expect("start chromium");
        let mut status = None;
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until_every(
                "chromium has loaded the page and exited",
                patience(LOAD_TIMEOUT),
                Duration::from_millis(20),
                || {
                    status = child.try_wait().expect("wait for chromium");
                    status.is_some()
                },
            )
        }));
        if let Err(panic) = waited {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("chromium's stderr:\n{}", read(&err_file));
            std::panic::resume_unwind(panic);
        }
        let status = status.expect("exited");
        assert!(
            status.success(),
            "chromium {args:?} {url} failed ({status}):\n{}",
            read(&err_file)
        );
        read(&out_file)
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}
