"""The dashboard (/ui) in a real browser: Debian's chromium, headless, driven by Playwright,
against a master and two fake-driver workers as separate processes. The fake driver's shell is
a local /bin/sh in a PTY, so the terminal test goes through the whole shell path.

Screenshots land in .data/screenshots (docs/dashboard-overview.png is one of them, committed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
import websockets.sync.client
from harness import REPO, Cluster, new_cluster, wait_until
from playwright.sync_api import Browser, Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `make test` installs it (test-deps)
AXE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"  # `make ui` installs it
SCREENSHOTS = REPO / ".data" / "screenshots"
UI_BUILT = REPO / "src" / "multiverse" / "master" / "ui" / "static" / "vendor" / "xterm.js"
WAIT = 60_000  # ms; the machine is shared and slow at times
expect.set_options(timeout=WAIT)

if not (CHROMIUM.exists() and AXE.exists() and UI_BUILT.exists()):
    pytest.fail(
        "the dashboard tests need chromium and the built front-end: run `make test-deps ui`",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with new_cluster(tmp_path_factory.mktemp("ui")) as cluster:
        cluster.start_master()
        cluster.start_worker("node-a", capacity="cpus=4,memory=8G,disk=100G")
        cluster.start_worker("node-b", capacity="cpus=8,memory=16G,disk=200G")
        yield cluster


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    # The cluster's CA is not the browser's (it is pinned in the CLI's config instead), and
    # axe-core is injected as an inline script, which the page's CSP rightly refuses.
    context = browser.new_context(
        ignore_https_errors=True, bypass_csp=True, viewport={"width": 1280, "height": 900}
    )
    opened = context.new_page()
    opened.set_default_timeout(WAIT)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, f"the page threw: {errors}"


def log_in(page: Page, cluster: Cluster, token: str) -> None:
    page.goto(f"{cluster.api}/ui/")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()


def accessibility_problems(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["html"] for n in v["nodes"]][:3]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def phone_width_problems(page: Page) -> list[str]:
    """Elements wider than a 375 px screen makes room for (tables scroll inside their box)."""
    page.set_viewport_size({"width": 375, "height": 800})
    return list(
        page.evaluate(
            """() => [...document.querySelectorAll('body *')]
              .filter((e) => !e.closest('.scroll') && e.getBoundingClientRect().right > 376)
              .map((e) => e.outerHTML.slice(0, 80))"""
        )
    )


def terminal_sizes(page: Page) -> list[tuple[int, int]]:
    """Every ``stty size`` answer (rows, columns) on the terminal's screen, in order."""
    text = page.locator("#terminal .xterm-rows").inner_text()
    return [(int(r), int(c)) for r, c in re.findall(r"^\s*(\d+) (\d+)\s*$", text, re.MULTILINE)]


def test_admin_moves_an_instance_to_another_node(ui: Cluster, page: Page) -> None:
    ui.ok("launch", "--name", "mover", "--node", "node-a")
    try:
        log_in(page, ui, ui.token)
        page.goto(f"{ui.api}/ui/instances/mover")
        expect(page.locator("#state")).to_have_text("Running")
        target = page.get_by_label("Move to")
        expect(target.locator("option")).to_have_count(2)  # "choose" and node-b, not node-a
        target.select_option("node-b")
        assert accessibility_problems(page) == []
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Move").click()
        wait_until(lambda: ui.instances()["mover"]["node"] == "node-b", timeout=60)
        expect(page.locator("#details")).to_contain_text("node-b")  # by the events stream
        expect(page.locator("#state")).to_have_text("Running")
    finally:
        ui.cli("delete", "mover")


def test_admin_launches_uses_the_terminal_and_deletes(ui: Cluster, page: Page) -> None:
    log_in(page, ui, ui.token)
    expect(page.locator(".node-card")).to_have_count(2)
    expect(page.locator("#total-nodes")).to_have_text("2/2")
    assert accessibility_problems(page) == []
    screenshot(page, "overview-empty")

    page.get_by_role("link", name="Launch").click()
    page.get_by_label("Name").fill("web-1")
    page.get_by_label("Node", exact=True).select_option("node-b")
    assert accessibility_problems(page) == []
    page.evaluate("window.notReloaded = true")  # gone if anything reloads the page
    page.get_by_role("button", name="Launch").click()
    expect(page).to_have_url(re.compile(r"/ui/instances/web-1$"))
    expect(page.locator("#state")).to_have_text("Running")  # by the events stream, no reload
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("#details")).to_contain_text("node-b")
    assert accessibility_problems(page) == []
    screenshot(page, "instance")

    page.get_by_role("button", name="Open terminal").click()
    expect(page.get_by_role("status").filter(has_text="connected")).to_be_visible()
    page.locator("#terminal").click()
    page.keyboard.type("stty size\n")
    page.wait_for_function(
        "document.querySelector('#terminal .xterm-rows').innerText.match(/^\\s*\\d+ \\d+\\s*$/m)"
    )
    first = terminal_sizes(page)[-1]
    shown = page.get_by_role("status").filter(has_text="connected").inner_text()
    assert f"({first[1]}x{first[0]})" in shown  # what xterm.js fitted is what the shell has
    assert first[0] > 5 and first[1] > 40

    page.set_viewport_size({"width": 375, "height": 700})  # a phone: the terminal follows
    expect(page.get_by_role("status").filter(has_text="connected")).not_to_have_text(shown)
    page.keyboard.type("stty size\n")
    page.wait_for_function(
        "document.querySelector('#terminal .xterm-rows').innerText"
        ".match(/^\\s*\\d+ \\d+\\s*$/mg).length >= 2"
    )
    second = terminal_sizes(page)[-1]
    assert second != first and second[1] < first[1]
    shown = page.get_by_role("status").filter(has_text="connected").inner_text()
    assert f"({second[1]}x{second[0]})" in shown
    assert phone_width_problems(page) == []
    page.set_viewport_size({"width": 1280, "height": 900})
    page.locator("#terminal").scroll_into_view_if_needed()
    screenshot(page, "terminal")

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    expect(page.locator("#details")).to_contain_text("web-1 is deleted")
    assert "web-1" not in ui.instances()


def test_overview_is_live_and_fits_a_phone(ui: Cluster, page: Page) -> None:
    page.set_viewport_size({"width": 375, "height": 800})
    log_in(page, ui, ui.token)
    # Launched and stopped from elsewhere (the CLI): the open page follows the events stream.
    ui.ok("launch", "--name", "live-1", "--node", "node-a")
    ui.ok("launch", "--name", "live-2", "--node", "node-b", "--cpus", "2", "--memory", "4G")
    try:
        ui.ok("stop", "live-2")
        for name, state in (("live-1", "Running"), ("live-2", "Stopped")):
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name))
            expect(row).to_contain_text(state)
        # Stopping may pass between two reports unseen: what must show is the stop itself.
        expect(page.locator(".events")).to_contain_text(re.compile(r"live-2: \w+ → Stopped"))
        expect(page.locator("#total-instances")).to_have_text("2")
        # Each node card shows what its host uses next to what is allocated, as text and meters.
        card = page.locator('.node-card[data-node="node-a"]')
        expect(card.locator(".bar-used")).to_have_count(3)
        memory_used = card.locator(".bar-used").nth(1)
        expect(memory_used).to_have_text(re.compile(r"^\d+(\.\d)? (B|KiB|MiB|GiB|TiB) used$"))
        expect(card).to_contain_text("allocated")
        meter = card.get_by_role("progressbar", name=re.compile(r"^Memory used \d+%$"))
        assert float(meter.get_attribute("value") or 0) > 0
        expect(page.locator(".totals .bar-used")).to_have_count(3)
        assert phone_width_problems(page) == []
        assert accessibility_problems(page) == []
        screenshot(page, "overview-phone")
        page.set_viewport_size({"width": 1280, "height": 900})
        screenshot(page, "overview")
    finally:
        ui.ok("delete", "live-1")
        ui.ok("delete", "live-2")


def test_launch_that_fits_nowhere_shows_each_nodes_reason(ui: Cluster, page: Page) -> None:
    log_in(page, ui, ui.token)
    page.get_by_role("link", name="Launch").click()
    page.get_by_label("Name").fill("too-big")
    page.get_by_label("CPUs").fill("64")
    page.get_by_role("button", name="Launch").click()
    reasons = page.locator("#why li")
    expect(reasons).to_have_count(2)
    expect(reasons.filter(has_text="node-a")).to_contain_text("4 of 64 cpus free")
    expect(reasons.filter(has_text="node-b")).to_contain_text("8 of 64 cpus free")
    assert phone_width_problems(page) == []
    assert "too-big" not in ui.instances()


def test_node_page_asks_before_it_cordons(ui: Cluster, page: Page) -> None:
    log_in(page, ui, ui.token)
    page.get_by_role("link", name="node-a").click()
    expect(page.get_by_role("heading", name=re.compile("Node node-a"))).to_be_visible()
    expect(page.locator("main .bar-used")).to_have_count(3)  # used next to allocated here too
    assert accessibility_problems(page) == []
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.get_by_role("button", name="Cordon").click()
    expect(page.get_by_role("button", name="Cordon")).to_be_enabled()
    assert ui.node("node-a")["cordoned"] is False  # dismissed: nothing was asked of the API
    try:
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Cordon").click()
        expect(page.locator("h1")).to_contain_text("Cordoned")  # redrawn by the node event
        assert ui.node("node-a")["cordoned"] is True
        page.get_by_role("button", name="Uncordon").click()
        expect(page.locator("h1")).not_to_contain_text("Cordoned")
    finally:
        ui.ok("node", "uncordon", "node-a")
    page.get_by_label("Add label").fill("zone=north")
    page.get_by_role("button", name="Set").click()
    expect(page.locator(".labels")).to_contain_text("zone=north")
    page.get_by_role("button", name="Remove zone").click()
    expect(page.locator("main")).to_contain_text("No labels.")
    assert "zone" not in ui.node("node-a")["labels"]


def test_viewer_sees_no_write_buttons_and_the_api_refuses_it(ui: Cluster, page: Page) -> None:
    viewer = ui.ok("token", "create", "--api", "--role", "viewer").out.strip()
    ui.ok("launch", "--name", "seen", "--node", "node-a")
    try:
        log_in(page, ui, viewer)
        expect(page.locator(".node-card")).to_have_count(2)
        expect(page.get_by_role("link", name="Launch")).to_be_hidden()
        expect(page.get_by_role("link", name="Tokens")).to_be_hidden()
        page.get_by_role("link", name="seen").click()
        expect(page.locator("#state")).to_have_text("Running")
        expect(page.locator("main button")).to_have_count(0)
        page.get_by_role("link", name="node-a").click()
        expect(page.get_by_role("heading", name=re.compile("Node node-a"))).to_be_visible()
        expect(page.locator("main button")).to_have_count(0)
        expect(page.locator("main form")).to_have_count(0)
        # The page hides the buttons; the API refuses the writes whatever a page does.
        refused = page.evaluate(
            """async () => {
              const token = sessionStorage.getItem("multiverse.token");
              const headers = {Authorization: `Bearer ${token}`};
              const calls = [["POST", "instances/seen/stop"], ["DELETE", "instances/seen"],
                             ["POST", "nodes/node-a/cordon"], ["GET", "tokens"]];
              const out = [];
              for (const [method, path] of calls) {
                const r = await fetch(`/api/v1/${path}`, {method, headers});
                out.push([r.status, (await r.json()).error.code]);
              }
              return out;
            }"""
        )
        assert refused == [[403, "permission_denied"]] * 4
        shell = page.evaluate(
            """() => new Promise((resolve) => {
              const token = sessionStorage.getItem("multiverse.token");
              const ws = new WebSocket(`wss://${location.host}/api/v1/instances/seen/shell`,
                                       ["multiverse.v1", "bearer.multiverse." + token]);
              ws.onopen = () => resolve("open");
              ws.onerror = () => resolve("refused");
            })"""
        )
        assert shell == "refused"
        assert ui.instances()["seen"]["state"] == "Running"
        assert ui.node("node-a")["cordoned"] is False
    finally:
        ui.ok("delete", "seen")


def test_faults_page_lists_faults_live_and_heals_them(ui: Cluster, page: Page) -> None:
    for name in ("hit-1", "hit-2"):
        ui.ok("launch", "--name", name, "--node", "node-a")
    try:
        log_in(page, ui, ui.token)
        page.get_by_role("link", name="Faults").click()
        expect(page.locator("#faults")).to_contain_text("No faults in force.")
        # Added from elsewhere (the CLI): the open page follows the events stream.
        first = ui.ok("fault", "kill", "hit-1", "--format", "json").json()
        second = ui.ok("fault", "kill", "hit-2", "--duration", "1h", "--format", "json").json()
        rows = page.locator("#faults tbody tr")
        expect(rows).to_have_count(2)
        row = rows.filter(has_text=second["id"])
        expect(row).to_contain_text("hit-2")
        expect(row).to_contain_text(re.compile(r"in (59|60) min"))
        expect(rows.filter(has_text=first["id"])).to_contain_text("never (until healed)")
        expect(page.locator(".events")).to_have_count(0)  # the overview's, not here
        assert accessibility_problems(page) == []
        screenshot(page, "faults")
        row.get_by_role("button", name=f"Heal {second['id']}").click()
        expect(rows).to_have_count(1)
        assert [f["id"] for f in ui.ok("fault", "list", "--format", "json").json()] == [first["id"]]
        ui.ok("fault", "kill", "hit-2", "--format", "json")
        expect(rows).to_have_count(2)
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.get_by_role("button", name="Heal all").click()
        expect(page.get_by_role("button", name="Heal all")).to_be_enabled()
        expect(rows).to_have_count(2)  # dismissed: nothing healed
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Heal all").click()
        expect(page.locator("#faults")).to_contain_text("No faults in force.")
        assert ui.ok("fault", "list", "--format", "json").json() == []
        # The overview's event list tells them too.
        page.get_by_role("link", name="Overview").click()
        expect(page.locator(".events")).to_contain_text(f"fault {second['id']} healed: kill hit-2")
        # A viewer sees the faults but no button to heal them.
        ui.ok("fault", "kill", "hit-1")
        viewer = ui.ok("token", "create", "--api", "--role", "viewer").out.strip()
        page.evaluate("sessionStorage.clear()")
        log_in(page, ui, viewer)
        page.get_by_role("link", name="Faults").click()
        expect(rows).to_have_count(1)
        expect(page.locator("main button")).to_have_count(0)
        assert accessibility_problems(page) == []
    finally:
        ui.ok("fault", "heal", "--all")
        for name in ("hit-1", "hit-2"):
            ui.ok("delete", name)


def test_tokens_page_shows_a_new_token_once_and_revokes(ui: Cluster, page: Page) -> None:
    log_in(page, ui, ui.token)
    page.get_by_role("link", name="Tokens").click()
    page.get_by_label("Description").fill("from the dashboard")
    page.get_by_role("button", name="Create").click()
    secret = page.locator("#new-token pre")
    expect(secret).to_have_text(re.compile(r"^mva\.[0-9a-f]+\..+"))
    token = secret.inner_text()
    token_id = token.split(".")[1]
    assert accessibility_problems(page) == []
    who = ui.http.get(f"{ui.api}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert who.json()["role"] == "viewer" and who.json()["id"] == token_id
    row = page.get_by_role("row").filter(has_text=token_id)
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    page.reload()
    expect(page.locator("#new-token pre")).to_have_count(0)  # shown once: not after a reload
    refused = ui.http.get(f"{ui.api}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401


def test_a_wrong_token_does_not_log_in(ui: Cluster, page: Page) -> None:
    page.goto(f"{ui.api}/ui/")
    page.get_by_label("API token").fill("mva.0000.not-a-secret")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("invalid API token")
    assert page.evaluate("sessionStorage.getItem('multiverse.token')") is None
    expect(page.get_by_role("navigation")).to_be_hidden()


def test_websocket_token_as_a_subprotocol(ui: Cluster) -> None:
    """A browser cannot send Authorization on a WebSocket: the token rides as a subprotocol,
    and the server answers with the plain protocol name, never echoing the token."""

    def connect(protocols: list[str]) -> str | None:
        with websockets.sync.client.connect(
            f"{ui.ws}/api/v1/events",
            ssl=ui.ssl_context,
            subprotocols=protocols,  # type: ignore[arg-type]
        ) as ws:
            return ws.subprotocol

    token = f"bearer.multiverse.{ui.token}"
    assert connect(["multiverse.v1", token]) == "multiverse.v1"
    for protocols in (["multiverse.v1", "bearer.multiverse.mva.00.wrong"], ["multiverse.v1"]):
        with pytest.raises(websockets.InvalidStatus) as refused:
            connect(protocols)
        assert refused.value.response.status_code == 401
        body = json.loads(refused.value.response.body or b"{}")
        assert body["error"]["code"] == "unauthenticated"


def test_pages_are_served_with_a_strict_policy(ui: Cluster) -> None:
    for path in ("/ui", "/ui/", "/ui/instances/anything"):
        response = ui.http.get(f"{ui.api}{path}")
        assert response.status_code == 200, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
    module = ui.http.get(f"{ui.api}/ui/static/vendor/xterm.js")
    assert module.headers["content-type"].startswith("text/javascript")
    missing = ui.http.get(f"{ui.api}/ui/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert ui.http.get(f"{ui.api}/api/v1/whoami").status_code == 401


def test_a_package_without_built_assets_says_how_to_build_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from multiverse.master import ui as dashboard

    (tmp_path / "index.html").write_text("<!doctype html>")
    monkeypatch.setattr(dashboard, "STATIC", tmp_path)  # as a tree where `make ui` never ran
    app = FastAPI()
    dashboard.mount(app)
    response = TestClient(app).get("/ui/")
    assert response.status_code == 503
    assert "make ui" in response.json()["error"]["message"]
