"""A screenshot of the web console for the README: the pool, and the playground after a few
streamed answers, with the charts.

Usage: python3 scripts/console_screenshot.py URL OUT_DIR
Needs a daemon at URL whose first model tells stories (the README's used the fixtures'
stories260k), admin from loopback (no keys), selenium, Debian's chromium and chromium-driver.
"""

import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, out = sys.argv[1], sys.argv[2]
options = webdriver.ChromeOptions()
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1500"]:
    options.add_argument(arg)
options.binary_location = shutil.which("chromium")
driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
try:
    driver.get(url + "/")
    driver.find_element(By.CSS_SELECTOR, "#chat-form [name=max_tokens]").clear()
    driver.find_element(By.CSS_SELECTOR, "#chat-form [name=max_tokens]").send_keys("60")
    time.sleep(2)
    driver.find_element(By.CSS_SELECTOR, "#chat-form [name=raw]").click()
    for _ in range(2):
        field = driver.find_element(By.ID, "chat-input")
        field.send_keys("Once upon a time")
        driver.find_element(By.ID, "chat-send").click()
        time.sleep(3)
    time.sleep(3)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, height + 40)
    driver.save_screenshot(f"{out}/console.png")
finally:
    driver.quit()
print(f"wrote {out}/console.png")
