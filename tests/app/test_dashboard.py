"""The dashboard's pages without a browser: which door each part is behind, what a shell leaks (nothing),
escaping of user-given names, and the Markdown subset model cards use. The browser walk is
tests/browser/test_dashboard.py."""

from __future__ import annotations

import pytest

from app.ui import markdown
from tests.app.conftest import checkpoint_bytes

PARTS = ["/ui/part/overview", "/ui/part/datasets", "/ui/part/models", "/ui/part/jobs", "/ui/part/merge",
         "/ui/part/recommend"]
PAGES = ["/ui", "/ui/datasets", "/ui/models", "/ui/jobs", "/ui/merge", "/ui/recommend"]


def test_parts_show_the_data_and_pages_are_data_free_shells(svc, recipe, dataset):
    for page in [*PAGES, f"/ui/models/{recipe['id']}"]:
        r = svc.client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert dataset["name"] not in r.text and recipe["sha256"][:16] not in r.text  # data comes with the part
    shell = svc.client.get(f"/ui/models/{recipe['id']}").text
    assert f'data-part="/ui/part/models/{recipe["id"]}"' in shell
    assert dataset["name"] in svc.client.get("/ui/part/datasets").text
    models = svc.client.get("/ui/part/models").text
    assert f'href="/ui/models/{recipe["id"]}"' in models
    merge = svc.client.get("/ui/part/merge").text
    assert f'value="{recipe["id"]}"' in merge and 'value="fisher"' in merge and 'name="fisher.n"' in merge
    assert svc.client.get("/ui/part/models/nope").status_code == 404
    assert svc.client.get("/ui/nowhere").status_code == 404


@pytest.mark.parametrize("part", PARTS)
def test_read_token_closes_every_part_but_not_the_shells(make_service, part):
    svc = make_service(token="write-token", READ_TOKEN="read-token")
    assert svc.client.get(part).status_code == 401
    assert svc.client.get(part, headers={"Authorization": "Bearer wrong"}).status_code == 401
    for token in ("read-token", "write-token"):  # the API token opens reads too
        assert svc.client.get(part, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert svc.client.get(PAGES[PARTS.index(part)]).status_code == 200
    assert svc.client.get("/ui/static/dashboard.js").status_code == 200


def test_model_page_and_figure_routes_are_closed_too(make_service, tmp_path):
    svc = make_service(token="w", READ_TOKEN="r")
    ds = svc.upload_dataset()
    m = svc.upload_recipe(checkpoint_bytes(tmp_path, ds["fingerprint"], ds["n_items"]), ds["id"]).json()
    for path in (f"/ui/part/models/{m['id']}", f"/ui/part/models/{m['id']}/figures/top-probs.png"):
        assert svc.client.get(path).status_code == 401
    ok = svc.client.get(f"/ui/part/models/{m['id']}", headers={"Authorization": "Bearer r"})
    assert ok.status_code == 200 and m["sha256"][:16] in ok.text


def test_names_are_escaped_everywhere(svc, dataset, tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    m = svc.upload_recipe(checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"]), dataset["id"],
                          name=evil).json()
    for path in ("/ui/part/models", f"/ui/part/models/{m['id']}", "/ui/part/merge", "/ui/part/recommend",
                 "/ui/part/overview"):
        text = svc.client.get(path).text
        assert evil not in text and "&lt;img src=x" in text, path


def test_figures_explain_what_they_need(svc, recipe):
    page = svc.client.get(f"/ui/part/models/{recipe['id']}").text
    assert "drawn for merges of exactly three stored ingredients" in page
    r = svc.client.get(f"/ui/part/models/{recipe['id']}/figures/merge-plane.png")
    assert r.status_code == 404 and "three" in r.json()["detail"]
    assert svc.client.get(f"/ui/part/models/{recipe['id']}/figures/bogus.png").status_code == 404


def test_markdown_renders_the_card_subset_and_escapes():
    html = markdown.render("# T <x>\n\nsome **bold** and `a<b>**c**`\n\n- one\n- `two`\n\n"
                           "| m | v |\n|---|---:|\n| a | 1 |\n\n```json\n{\"k\": \"<v>\"}\n```", shift=1)
    assert "<h2>T &lt;x&gt;</h2>" in html
    assert "<strong>bold</strong>" in html and "<code>a&lt;b&gt;**c**</code>" in html
    assert "<ul><li>one</li><li><code>two</code></li></ul>" in html
    assert "<th>m</th><th class=num>v</th>" in html and "<td class=num>1</td>" in html
    assert '<pre><code class="lang-json">{&quot;k&quot;: &quot;&lt;v&gt;&quot;}</code></pre>' in html


def test_the_merge_form_describes_every_registered_method_from_the_registry_itself():
    from app.ui.views import merge_methods, needs_text
    from merging.methods import METHODS

    rows = {r["name"]: r for r in merge_methods()}
    assert list(rows) == list(METHODS)
    for name, cls in METHODS.items():
        for opt, f in cls.Options.model_fields.items():
            assert any(line.startswith(f"{opt} (default {f.default!r})") for line in rows[name]["options"]), (name, opt)
    assert rows["fisher"]["fisher"] == "always" and rows["uniform"]["fisher"] == "never"
    assert rows["weight-search"]["fisher"] == {"combine": "fisher"}
    assert rows["weight-search"]["base"] == {"combine": "task-vectors"}
    assert rows["adamerging"]["base"] == "always" and rows["uniform"]["base"] == "never"
    assert needs_text(list(rows.values()), "base").endswith("; weight-search with combine task-vectors")

