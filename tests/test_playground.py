"""The playground page at `/`, driven in headless Chromium (Debian's, through Playwright; nothing is
downloaded) as a person would use it: a key, a user, two preferences, a question answered with and
without them, a click on the preferred answer. The click's feedback is then in the store, exports to
JSONL, and `jobs.train` trains on the export. A screenshot goes to FSPO_SCREENSHOT_DIR if set (docs/)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import free_port
from test_openai import ADMIN, KEY
from test_serve import service_app
from test_store import sql

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
# As root, with no network: the flags the machine notes say Chromium needs (python.md, "Known to work").
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
PAIRS = [("How do I brew coffee?", "Certainly. Grind fresh beans. That is all.",
          "Hey! Grind fresh beans. You are going to love it!"),
         ("How do I sleep better?", "Indeed. Keep a fixed bedtime. Proceed with care.",
          "Yo! Keep a fixed bedtime. Enjoy every minute!")]  # fmt: skip
QUESTIONS = ("How do I bake bread?", "How do I learn to swim?", "How do I plant a tree?", "How do I fix a bike?")


@pytest.fixture(scope="module")
def playground(local_ray, tmp_path_factory, trained_tiny):
    from ray import serve

    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    store = tmp_path_factory.mktemp("store") / "histories.db"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = service_app(trained_tiny, "transformers", 0.25, env={"FSPO_TEST_KEY": KEY, "FSPO_TEST_ADMIN": ADMIN},
                      api_key_env="FSPO_TEST_KEY", admin_key_env="FSPO_TEST_ADMIN", store_url=str(store),
                      max_new_tokens_limit=24)  # fmt: skip
    serve.run(app, name="playground", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "store": f"sqlite://{store}"}
    serve.shutdown()


def test_feedback_clicked_in_the_browser_is_stored_exported_and_trained_on(playground, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(playground["url"] + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        expect(page.locator("#model")).to_have_text("model: trained")
        page.fill("#user-id", "ada")
        page.click("#user-form button")
        for question, preferred, dispreferred in PAIRS:
            page.fill("#pair-question", question)
            page.fill("#pair-preferred", preferred)
            page.fill("#pair-dispreferred", dispreferred)
            page.click("#pair-form button")
            expect(page.locator("#status")).to_have_text("preference added")
        expect(page.locator("#pairs li")).to_have_count(2)  # the ordinary key: the pairs added here
        # The tiny test model may answer a question alike with and without the history (machines differ in
        # which): the page then offers nothing to choose, and the person asks another question.
        for question in QUESTIONS:
            page.fill("#question", question)
            page.click("#ask-form button")
            expect(page.locator("#status")).to_have_text(
                re.compile("which answer does the user prefer\\?|the two answers are the same: nothing to choose"),
                timeout=120_000,
            )
            if page.inner_text("#status") == "which answer does the user prefer?":
                break
            expect(page.locator("#prefer-personalized")).to_be_disabled()
            expect(page.locator("#prefer-base")).to_be_disabled()
        else:
            pytest.fail(f"the personalized and base answers were the same for every one of {QUESTIONS}")
        personalized = page.inner_text("#answer-personalized")
        base = page.inner_text("#answer-base")
        assert personalized and base and personalized != base
        page.click("#prefer-personalized")
        expect(page.locator("#status")).to_contain_text("feedback stored as pair")
        expect(page.locator("#pairs li")).to_have_count(3)
        shot = tmp_path / "playground.png"
        page.screenshot(path=str(shot))
        browser.close()
    if os.environ.get("FSPO_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["FSPO_SCREENSHOT_DIR"]) / "playground.png")

    rows = sql(playground["store"], "SELECT question, preferred, dispreferred, source FROM pairs WHERE user_id = ?"
                                    " ORDER BY seq", "ada")  # fmt: skip
    assert rows == [(*pair, "api") for pair in PAIRS] + [(question, personalized.strip(), base.strip(),
                                                          "feedback")]  # fmt: skip

    from jobs.export_preferences import main as export

    out = tmp_path / "export"
    counts = export([f"store={playground['store']}", f"out={out}", "test_fraction=0"])
    assert counts == {"train_pairs": 3, "test_pairs": 0, "train_users": 1, "test_users": 0}
    exported = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert exported[-1] == {"user_id": "ada", "question": question, "preferred": personalized.strip(),
                            "dispreferred": base.strip()}  # fmt: skip

    # The job as users run it, in this process: it joins the module's Ray, which serves the playground.
    from jobs.train import main as train

    train(["model=tiny", f"datasets=[{out / 'train.jsonl'}]", "shots=1", "loss=sft", "batch_size=2", "n_examples=4",
           "num_workers=1", "exp_name=served", f"storage_path={tmp_path / 'runs'}"])  # fmt: skip
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "served" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["counters/examples"] == 4
