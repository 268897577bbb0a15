"""Drives the control panel in headless Chromium (Debian's, through Playwright): signs in, opens the wizard,
estimates and starts a move of a real tenant, watches the monitor until it is migrated, finalizes it and finds
it in the history. Screenshots go to the directory given. Usage: panel.py BASE_URL TOKEN TENANT BACKEND OUT_DIR"""

import sys

from playwright.sync_api import expect, sync_playwright

base, token, tenant, backend, out = sys.argv[1:6]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/ui")

    # A wrong token is refused, the right one signs in.
    page.fill("#token", "not-the-token-at-all")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("Sign-in failed")
    page.fill("#token", token)
    page.click("#login-form button")
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#tiles")).to_contain_text("active moves")

    # Tenants, searched on the server.
    page.click("nav a[data-view=tenants]")
    page.fill("#tenant-search", tenant)
    expect(page.locator("#tenant-table tbody tr").first).to_contain_text(tenant)
    expect(page.locator("#tenant-count")).to_contain_text("of 1")
    page.screenshot(path=f"{out}/panel-tenants.png")

    # The wizard: estimate, then start now.
    page.click("nav a[data-view=wizard]")
    page.fill("#w-tenant", tenant)
    page.select_option("#w-backend", backend)
    page.select_option("#w-verify", "hash")
    page.select_option("#w-cutover", "auto")
    page.click("#estimate")
    expect(page.locator("#estimate-out")).to_contain_text(f"Estimate for {tenant}")
    expect(page.locator("#estimate-out")).to_contain_text("passed")
    page.screenshot(path=f"{out}/panel-wizard.png", full_page=True)
    page.click("#start-now")

    # The monitor follows the move over server-sent events until it is migrated.
    expect(page).to_have_url(f"{base}/ui#monitor/{tenant}")
    expect(page.locator("#m-state")).to_have_text("migrated", timeout=90_000)
    expect(page.locator("#m-log")).to_contain_text("cutover swapped")
    expect(page.locator("#m-steps")).to_contain_text("dual_write")
    page.screenshot(path=f"{out}/panel-monitor.png")
    page.click("#monitor [data-act=finalize]")
    expect(page.locator("#m-state")).to_have_text("completed", timeout=30_000)

    # The dashboard and the history show it.
    page.click("nav a[data-view=history]")
    expect(page.locator("#history-table tbody")).to_contain_text(tenant)
    expect(page.locator("#history-table tbody")).to_contain_text("completed")
    page.click("nav a[data-view=dashboard]")
    expect(page.locator("#tiles")).to_contain_text("completed today")
    expect(page.locator("#tiles .tile").nth(1)).to_contain_text("1")
    page.screenshot(path=f"{out}/panel-dashboard.png")
    page.click("nav a[data-view=audit]")
    expect(page.locator("#audit-table tbody")).to_contain_text("migrate.finalize")
    if errors:
        raise SystemExit("page errors: " + "; ".join(errors))
    browser.close()
print("panel ok")
