"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright): the whole flow a
user walks — upload recipes, start a Fisher merge from the form (a field error first), watch the job
finish, read the merged model's page, get titled recommendations — with every console error and failed
request failing the test. A second test closes the service with tokens and cancels a job."""

from __future__ import annotations

import re

import pytest

from tests.browser.harness import chromium_path, launch, register_dataset, serve, write_checkpoint, write_titled_source

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (make sysdeps, as "
                                                                "root on Debian, installs it)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
expect = sync_api.expect
# Generous waits: on a busy shared machine a first request may import torch-side modules for seconds. A
# waiting assertion still fails when what it waits for never comes.
expect.set_options(timeout=60_000)


class Watch:
    """Everything that went wrong in the page: console errors, uncaught exceptions, failed requests and
    HTTP errors. A test names the errors it provokes; anything else fails it."""

    def __init__(self, page):
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"exception: {e}"))
        page.on("requestfailed", self._failed)
        page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"HTTP {r.status}: {r.request.method} {r.url}"))

    def _failed(self, request):
        # A navigation cancels the refresh of the page being left: that fetch is aborted, not failed.
        if request.failure == "net::ERR_ABORTED" and request.method == "GET" and "/ui/part/" in request.url:
            return
        self.problems.append(f"request failed: {request.method} {request.url} {request.failure}")

    def expected(self, *patterns: str) -> None:
        """Drop exactly one problem per pattern; each must have happened."""
        for pattern in patterns:
            hit = next((p for p in self.problems if re.search(pattern, p)), None)
            assert hit is not None, f"expected a problem matching {pattern!r}, got {self.problems}"
            self.problems.remove(hit)

    def clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def test_upload_merge_watch_model_recommend(browser, tmp_path):
    with serve(tmp_path / "svc") as (base, app):
        ds = register_dataset(app, write_titled_source(tmp_path / "films"))
        page = browser.new_page()
        watch = Watch(page)

        # Three recipes uploaded through the form; each lands on its model page.
        for k, name in enumerate(["recipe-a", "recipe-b", "recipe-c"]):
            page.goto(f"{base}/ui/datasets")
            ckpt = write_checkpoint(tmp_path / f"{name}.safetensors", ds["fingerprint"], ds["n_items"], seed=k)
            form = page.locator("#recipe-form")
            form.locator("input[name=file]").set_input_files(str(ckpt))
            form.locator("input[name=name]").fill(name)
            form.locator("select[name=dataset_id]").select_option(ds["id"])
            form.get_by_role("button", name="Upload recipe").click()
            expect(page).to_have_url(re.compile(r"/ui/models/[0-9a-f-]{36}$"))
            expect(page.locator("#part h1")).to_contain_text(name)
            expect(page.locator("article.card").get_by_role("heading", name="Lineage")).to_be_visible()

        # The merge form: top-k sampling without n is refused at the Fisher settings, nothing is queued.
        page.goto(f"{base}/ui/merge")
        form = page.locator("#merge-form")
        for name in ["recipe-a", "recipe-b", "recipe-c"]:
            form.get_by_label(name).check()
        # The form follows the registry: a method's options are listed, and the Fisher settings appear
        # only for what uses Fishers (weight-search only with combine fisher).
        fisher_box = form.locator("#fisher-settings")
        form.locator("select[name=method]").select_option("weight-search")
        expect(form.locator("#m-options-help")).to_contain_text("grid (default 51)")
        expect(fisher_box).to_be_hidden()
        form.locator("input[name=options]").fill('{"combine": "fisher"}')
        expect(fisher_box).to_be_visible()
        form.locator("input[name=options]").fill("")
        form.locator("select[name=method]").select_option("uniform")
        expect(fisher_box).to_be_hidden()
        form.locator("select[name=method]").select_option("fisher")
        expect(fisher_box).to_be_visible()
        expect(form.locator("#m-options-help")).to_contain_text("normalize (default False)")
        form.locator("select[name='fisher.sampling']").select_option("topk")
        form.locator("input[name='fisher.n']").fill("")
        form.locator("input[name=name]").fill("soup")
        form.get_by_role("button", name="Start merge").click()
        fisher_error = form.locator("[data-field=fisher] > .field-error")
        expect(fisher_error).to_be_visible()
        expect(fisher_error).to_contain_text("n is required")
        expect(page).to_have_url(f"{base}/ui/merge")
        watch.expected(r"HTTP 422: POST .*/merge-jobs$", r"console: .*422")
        with app.state.sessions() as s:
            from core.db_models import Job

            assert s.query(Job).count() == 0

        form.locator("input[name='fisher.n']").fill("5")
        form.get_by_role("button", name="Start merge").click()
        expect(fisher_error).to_be_hidden()
        expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))

        # The job page refreshes itself until the merge and the jobs it waits for are done.
        job = page.locator("#job")
        expect(job).to_have_attribute("data-status", "succeeded", timeout=480_000)
        children = page.locator("#job table").first.locator("tbody tr")
        expect(children).to_have_count(6)  # three Fishers, three evaluations of the ingredients
        expect(children.filter(has_text="succeeded")).to_have_count(6)
        page.locator("#result-model").click()

        # The merged model: lineage, metrics beside the ingredients, chart, figures, card.
        expect(page.locator("#part h1")).to_contain_text("soup")
        lineage = page.locator("ol.lineage")
        for name in ["recipe-a", "recipe-b", "recipe-c"]:
            expect(lineage.get_by_role("link", name=name)).to_be_visible()
        expect(lineage).to_contain_text("fisher")
        expect(page.locator("table.metrics tbody tr")).to_have_count(4)
        expect(page.locator(".chart svg rect")).to_have_count(4)
        for figure in ["top-probs", "merge-plane"]:
            img = page.locator(f"[data-figure={figure}] img")
            expect(img).to_have_attribute("src", re.compile(r"^blob:"), timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=img.element_handle())
        expect(page.locator("[data-figure=k-stat]")).to_contain_text("Not available")
        expect(page.locator("article.card")).to_contain_text("fisher")

        # Recommendations for a user, then for a typed history, with titles.
        page.get_by_role("link", name="Try it").click()
        form = page.locator("#recommend-form")
        form.locator("input[name=user]").fill("7")
        form.locator("input[name=k]").fill("5")
        form.get_by_role("button", name="Recommend").click()
        rows = page.locator("#recommendations tbody tr")
        expect(rows).to_have_count(5)
        expect(rows.first).to_contain_text("Film number")
        expect(page.locator("#recommendations caption")).to_contain_text("user 7")
        form.get_by_label("a typed history").check()
        form.locator("input[name=items]").fill("3 4 5")
        form.locator("input[name=k]").fill("8")
        form.get_by_role("button", name="Recommend").click()
        expect(rows).to_have_count(8)
        expect(page.locator("#recommendations caption")).to_contain_text("typed history")
        recommended = rows.locator("td:nth-child(2)").all_inner_texts()
        assert not {"3", "4", "5"} & set(recommended)  # the history is never recommended back

        # The lists: the merged model among the models, every job succeeded.
        page.goto(f"{base}/ui/models")
        expect(page.locator("section", has_text="Merged models").get_by_role("link", name="soup")).to_be_visible()
        page.goto(f"{base}/ui/jobs")
        expect(page.locator("table.jobs tbody tr")).to_have_count(7)
        expect(page.locator("table.jobs .status-succeeded")).to_have_count(7)
        page.goto(f"{base}/ui")
        expect(page.locator(".stat", has_text="merged models")).to_contain_text("1")
        watch.clean()


def test_tokens_dataset_upload_and_cancel(browser, tmp_path):
    """Reads closed by RECMERGE_READ_TOKEN and writes by RECMERGE_API_TOKEN: nothing shows until the token
    is given; with it, a dataset is uploaded and a queued merge cancelled (no runner: jobs stay queued)."""
    with serve(tmp_path / "svc", jobs=False, API_TOKEN="write-token", READ_TOKEN="read-token") as (base, app):
        ds = register_dataset(app, write_titled_source(tmp_path / "films"))
        page = browser.new_page()
        watch = Watch(page)
        page.goto(f"{base}/ui/datasets")
        expect(page.locator("#part")).to_contain_text("RECMERGE_READ_TOKEN")
        expect(page.locator("#part")).not_to_contain_text("films")
        watch.expected(r"HTTP 401: GET .*/ui/part/datasets", r"console: .*401")

        # The read token shows the data but cannot write.
        page.locator("#token-input").fill("read-token")
        page.get_by_role("button", name="Use").click()
        expect(page.locator("tr[data-dataset]")).to_contain_text("films")
        form = page.locator("#dataset-form")
        (tmp_path / "inter.csv").write_text("user,item,ts\n" + "".join(f"u{u},{i},{t}\n" for u in range(8)
                                                                   for t, i in enumerate(range(6))))
        form.locator("input[name=file]").set_input_files(str(tmp_path / "inter.csv"))
        form.locator("input[name=name]").fill("uploaded")
        form.get_by_role("button", name="Upload dataset").click()
        expect(form.locator(".form-error")).to_contain_text("wrong API token")
        watch.expected(r"HTTP 401: POST .*/datasets$", r"console: .*401")

        page.locator("#token-input").fill("write-token")
        loads = page.locator("#part").get_attribute("data-loads")
        page.get_by_role("button", name="Use").click()
        # The token reloads the page's part: fill the form that replaces this one, not this one.
        expect(page.locator("#part")).not_to_have_attribute("data-loads", loads)
        form = page.locator("#dataset-form")
        form.locator("input[name=file]").set_input_files(str(tmp_path / "inter.csv"))
        form.locator("input[name=name]").fill("uploaded")
        form.get_by_role("button", name="Upload dataset").click()
        expect(page.locator("tr[data-dataset]", has_text="uploaded")).to_contain_text("48")

        # A merge with no runner stays queued: the job page offers to cancel it.
        import httpx

        auth = {"Authorization": "Bearer write-token"}
        http = httpx.Client(base_url=base, headers=auth, timeout=120)
        ids = []
        for k in range(2):
            ckpt = write_checkpoint(tmp_path / f"r{k}.safetensors", ds["fingerprint"], ds["n_items"], seed=k)
            r = http.post("/recipes", data={"name": f"r{k}", "dataset_id": ds["id"]},
                           files={"file": ckpt.open("rb")})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        r = http.post("/merge-jobs", json={"method": "uniform", "model_ids": ids, "evaluate": False})
        assert r.status_code == 202, r.text
        page.goto(f"{base}/ui/jobs/{r.json()['id']}")
        expect(page.locator("#job")).to_have_attribute("data-status", "queued")
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator("#job")).to_have_attribute("data-status", "cancelled")
        expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
        assert http.get(f"/merge-jobs/{r.json()['id']}").json()["status"] == "cancelled"
        watch.clean()
