"""Drives the admin API's infrastructure map in a real headless Chromium (Debian's chromium and
chromium-driver, Python selenium) for tests/admin_page.rs.

    python3 tests/page_check.py URL TOKEN NODES VICTIM SCREENSHOT

Opens URL (the admin API's `/`) with TOKEN already in the tab's sessionStorage (where the page
keeps the token an operator types), waits until NODES node cards show `alive` with their
instances, checks that the browser logged no console error, prints `READY`, then waits for a
line `KILLED` on stdin (the test has kill -9'd VICTIM) and waits at most 5 s for VICTIM's card to
turn red (`data-state="down"` and a red border as computed by the browser). Saves a screenshot
to SCREENSHOT and prints `SCREENSHOT path`. Prints `FAIL why` and exits 1 on any failure.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

url, token, want_nodes, victim, shot = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]


def say(*words):
    print(*words, flush=True)


def fail(why):
    say("FAIL", why)
    sys.exit(1)


def find(name):
    for p in (name, "/usr/bin/" + name, "/usr/lib/chromium/" + name):
        if shutil.which(p):
            return shutil.which(p)
    fail(f"{name} not found: scripts/setup installs Debian's chromium and chromium-driver")


profile = tempfile.mkdtemp(prefix="stage-chromium-")
opts = webdriver.ChromeOptions()
opts.binary_location = find("chromium")
# This machine's network is closed: nothing that phones home, a fresh profile.
for a in (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
    f"--user-data-dir={profile}",
):
    opts.add_argument(a)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(options=opts, service=Service(executable_path=find("chromedriver")))


def console_errors():
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def cards():
    """Every node card as {node, state, instances, border} read from the live DOM."""
    return driver.execute_script(
        """
        return Array.from(document.querySelectorAll('#nodes .node')).map(c => ({
            node: c.dataset.node, state: c.dataset.state,
            instances: Number(c.dataset.instances || 0),
            border: getComputedStyle(c).borderTopColor,
            text: c.innerText,
        }));
        """
    )


def is_red(rgb):
    # "rgb(r, g, b)": red dominates clearly.
    try:
        r, g, b = [int(x) for x in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    except ValueError:
        return False
    return r >= 150 and g <= 90 and b <= 90


try:
    # The token, as the page keeps it after an operator typed it, set before any script runs.
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": f"sessionStorage.setItem('stage-admin-token', {json.dumps(token)});"},
    )
    driver.get(url)
    if driver.title != "stage: infrastructure map":
        fail(f"unexpected title {driver.title!r}")
    end = time.time() + 30
    seen = []
    while time.time() < end:
        seen = cards()
        alive = [c for c in seen if c["state"] == "alive" and c["instances"] > 0]
        if len(seen) == want_nodes and len(alive) == want_nodes:
            break
        time.sleep(0.2)
    else:
        fail(f"the page never showed {want_nodes} alive nodes with instances: {seen}")
    if any(is_red(c["border"]) for c in seen):
        fail(f"an alive node is drawn red: {seen}")
    if not any(c["node"] == victim for c in seen):
        fail(f"no card for {victim}: {seen}")
    errs = console_errors()
    if errs:
        fail(f"console errors after load: {errs}")
    live = driver.find_element("id", "live").text
    if live.strip().lower() != "live":
        fail(f"the header does not say live: {live!r}")
    say("READY", len(seen))

    line = sys.stdin.readline().strip()
    if line != "KILLED":
        fail(f"expected KILLED on stdin, got {line!r}")
    t0 = time.time()
    red = None
    while time.time() - t0 < 5.0:
        v = [c for c in cards() if c["node"] == victim]
        if v and v[0]["state"] == "down" and is_red(v[0]["border"]):
            red = v[0]
            break
        time.sleep(0.05)
    took = time.time() - t0
    # A second so that the messages/s figures have two snapshots, then the picture.
    time.sleep(1.0)
    os.makedirs(os.path.dirname(os.path.abspath(shot)), exist_ok=True)
    driver.save_screenshot(shot)
    say("SCREENSHOT", os.path.abspath(shot))
    if red is None:
        fail(f"{victim} not red within 5 s: {[c for c in cards() if c['node'] == victim]}")
    others = [c for c in cards() if c["node"] != victim]
    if any(c["state"] != "alive" or is_red(c["border"]) for c in others):
        fail(f"another node changed too: {others}")
    errs = console_errors()
    if errs:
        fail(f"console errors: {errs}")
    say("RED", f"{took * 1000:.0f}", red["border"])
    say("OK")
finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
