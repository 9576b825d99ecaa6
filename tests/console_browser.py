"""The web console in a real headless Chromium (selenium with Debian's chromium-driver).

Usage: console_browser.py URL open POOL_PATH HOSTILE_NAME
       console_browser.py URL keyed ADMIN_KEY INFERENCE_KEY

`open`: a daemon without keys (loopback may administer): the replicas are listed, a hostile
model name renders as text, the playground streams an answer equal to the API's and its stop
button cancels a slow one, evict / reload / load from the page change the listing, a broken
pool.toml shows its diagnostics, the charts draw. `keyed`: only a key prompt without a key, an
inference key is refused, the admin key opens the console, and an action made with a key that
is not the admin key is refused. Prints "all checks passed" when every check holds.
"""

import json
import shutil
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

URL = sys.argv[1]
TIMEOUT = 60


def browser():
    options = webdriver.ChromeOptions()
    for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]:
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    return driver


def wait(what, check, timeout=TIMEOUT):
    """Polls `check` until it returns a truthy value (stale elements are retried)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
            last = value
        except StaleElementReferenceException as err:
            last = err
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def text(driver, selector):
    return driver.find_element(By.CSS_SELECTOR, selector).text


def rows(driver):
    """The replica table as {model: [cell texts of each of its rows]}."""
    table = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr"):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        table.setdefault(cells[0], []).append(cells)
    return table


def click_action(driver, model, action):
    def attempt():
        for tr in driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr"):
            if tr.find_element(By.TAG_NAME, "td").text == model:
                buttons = tr.find_elements(By.CSS_SELECTOR, f"button[data-action={action}]")
                if buttons:
                    buttons[0].click()
                    return True
        return False

    wait(f"the {action} button of {model}", attempt)


def outcome(driver, expected):
    return wait(f"outcome {expected!r}", lambda: expected in text(driver, "#outcome") and text(driver, "#outcome"))


def no_alert(driver):
    try:
        alert = driver.switch_to.alert
        raise AssertionError(f"a script ran: alert {alert.text!r}")
    except NoAlertPresentException:
        pass


def console_errors(driver):
    """Severe browser log entries (CSP violations, script errors), favicon misses aside."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE"
        and "favicon" not in entry["message"]
        and "the server responded with a status of 4" not in entry["message"]
    ]


def api_chat(model, message, max_tokens, key=None):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    request = urllib.request.Request(
        f"{URL}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def chat(driver, model, message, max_tokens, temperature="0"):
    Select(driver.find_element(By.ID, "chat-model")).select_by_value(model)
    for name, value in [("temperature", temperature), ("max_tokens", str(max_tokens))]:
        field = driver.find_element(By.CSS_SELECTOR, f"#chat-form [name={name}]")
        field.clear()
        field.send_keys(value)
    driver.find_element(By.ID, "chat-input").send_keys(message)
    driver.find_element(By.ID, "chat-send").click()


def check_open(pool_path, hostile):
    driver = browser()
    try:
        driver.get(URL + "/")
        table = wait("the replicas", lambda: (t := rows(driver)) and "first" in t and "slow" in t and t)
        assert table["first"][0][3] == "ready", table
        assert table["first"][0][2] == "cpu", table
        devices = wait("the devices", lambda: text(driver, "#devices tbody"))
        assert devices.startswith("cpu"), devices

        # The hostile name is a name, not markup.
        wait("the hostile name", lambda: hostile in rows(driver))
        assert not driver.find_elements(By.CSS_SELECTOR, "#replicas img"), "the name became markup"
        no_alert(driver)

        # The playground streams the same answer the API gives at temperature 0.
        expected = api_chat("first", "Hello there", 12)
        chat(driver, "first", "Hello there", 12)
        stats = wait("the answer's stats", lambda: "tokens/s" in (s := text(driver, "#chat-stats")) and s)
        assert "time to first token" in stats and "finish: length" in stats, stats
        answer = driver.find_elements(By.CSS_SELECTOR, "#transcript .turn-assistant .text")[-1]
        assert answer.get_property("textContent") == expected, (answer.get_property("textContent"), expected)

        # Stop cancels a slow answer; the daemon's request ends.
        driver.find_element(By.ID, "chat-clear").click()
        chat(driver, "slow", "Tell me a long story", 400, temperature="1")
        wait("the first tokens of the slow answer", lambda: driver.find_elements(By.CSS_SELECTOR, "#transcript .turn-assistant .text")[-1].get_property("textContent"))
        driver.find_element(By.ID, "chat-stop").click()
        wait("the stop", lambda: text(driver, "#chat-stats").startswith("stopped"))
        wait("the slow request to end", lambda: rows(driver)["slow"][0][5] == "0")

        # Evict and reload from the page.
        click_action(driver, "second", "evict")
        outcome(driver, "second: evicted")
        wait("second to leave the list", lambda: "second" not in rows(driver))
        generation = rows(driver)["first"][0][4]
        click_action(driver, "first", "reload")
        outcome(driver, "first: reloaded")
        wait("a new generation of first", lambda: rows(driver)["first"][0][4] != generation and rows(driver)["first"][0][3] == "ready")

        # Load from the form.
        driver.find_element(By.CSS_SELECTOR, "#actions summary").click()
        form = driver.find_element(By.ID, "load-form")
        form.find_element(By.NAME, "name").send_keys("third")
        form.find_element(By.NAME, "source").send_keys("builtin:demo")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        outcome(driver, "third: loaded")
        wait("third in the list", lambda: "third" in rows(driver) and rows(driver)["third"][0][3] == "ready")

        # A broken pool.toml shows its diagnostics and changes nothing.
        with open(pool_path, "a") as f:
            f.write("\n[[models]]\nname = 7\n")
        driver.find_element(By.ID, "reload-pool").click()
        shown = outcome(driver, "refused (400)")
        assert "pool.toml" in shown and "name" in shown, shown
        assert "first" in rows(driver)

        # The charts have drawn the tokens the playground generated.
        wait("a tokens/s line", lambda: driver.find_elements(By.CSS_SELECTOR, "#chart-tokens polyline"))
        legend = text(driver, "#legend")
        assert "first" in legend and hostile in legend, legend
        no_alert(driver)
        errors = console_errors(driver)
        assert not errors, errors
    finally:
        driver.quit()


def check_keyed(admin_key, inference_key):
    driver = browser()
    try:
        driver.get(URL + "/")
        wait("the key prompt", lambda: driver.find_element(By.ID, "key-prompt").is_displayed())
        assert not driver.find_element(By.ID, "console").is_displayed()
        assert not driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")

        driver.find_element(By.ID, "key-input").send_keys(inference_key)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        refused = wait("the refusal", lambda: text(driver, "#key-error"))
        assert "refused" in refused, refused
        assert not driver.find_element(By.ID, "console").is_displayed()
        assert not driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")

        driver.find_element(By.ID, "key-input").send_keys(admin_key)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait("the console", lambda: driver.find_element(By.ID, "console").is_displayed())
        wait("the replicas", lambda: "first" in rows(driver))
        assert driver.execute_script("return localStorage.length") == 0

        # An action made with a key that is not the admin key is refused; nothing changes.
        driver.execute_script("sessionStorage.setItem('llorch-admin-key', arguments[0])", inference_key)
        click_action(driver, "first", "evict")
        shown = outcome(driver, "refused (40")
        assert "refused (401)" in shown or "refused (403)" in shown, shown
        time.sleep(0.5)
        assert rows(driver)["first"][0][3] == "ready", rows(driver)
        errors = console_errors(driver)
        assert not errors, errors
    finally:
        driver.quit()


if __name__ == "__main__":
    if sys.argv[2] == "open":
        check_open(sys.argv[3], sys.argv[4])
    else:
        check_keyed(sys.argv[3], sys.argv[4])
    print("all checks passed")
