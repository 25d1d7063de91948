"""Example crawl job: a plain Scrapy spider over a books.toscrape-like site, to Avro.

The spider is an ordinary Scrapy spider, nothing fanout-specific inside it: it
would run as is under ``scrapy runspider``. ``CrawlJob`` runs it as
checkpointed chunks and writes what it yields as ``book`` records
(``schemas/book.avsc``).

Run it on the shipped demo site (30 pages: a home page, 5 catalogue pages, 24
books)::

    python -m http.server --bind 127.0.0.1 8000 --directory jobs/site &
    fanout run jobs/site_crawl.py
    fanout cat | head -3

or on another copy of the site (``-p`` params are spider arguments)::

    python tests/support/sites.py --site books --pages 5000 --port 8001 &
    fanout run jobs/site_crawl.py -p start_url=http://127.0.0.1:8001/
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import scrapy
from scrapy.http import Response

from fanout.crawl import CrawlJob

RATINGS = {"One": 1, "Two": 2, "Three": 3, "Four": 4, "Five": 5}


class BooksSpider(scrapy.Spider):
    """Home → categories → catalogue pages (and their next pages) → books."""

    name = "books"
    custom_settings = {"DEPTH_LIMIT": 20, "ROBOTSTXT_OBEY": False}

    def __init__(self, start_url: str = "http://127.0.0.1:8000/", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_urls = [start_url]

    def parse(self, response: Response, **kwargs: Any) -> Iterator[scrapy.Request]:
        """The home page and catalogue pages: follow categories, books and the next page."""
        for href in response.css("ul.categories a::attr(href)").getall():
            yield response.follow(href, callback=self.parse)
        for href in response.css("article.product_pod h3 a::attr(href)").getall():
            yield response.follow(href, callback=self.parse_book)
        next_page = response.css("li.next a::attr(href)").get()
        if next_page:
            yield response.follow(next_page, callback=self.parse)

    def parse_book(self, response: Response) -> Iterator[dict[str, Any]]:
        """A book page: one record."""
        main = response.css("div.product_main")
        price = main.css("p.price_color::text").re_first(r"[\d.]+")
        stars = main.css("p.star-rating::attr(class)").get(default="").split()
        yield {
            "url": response.url,
            "title": main.css("h1::text").get(default="").strip(),
            "price": float(price) if price else 0.0,
            "availability": main.css("p.availability").xpath("normalize-space()").get(default=""),
            "rating": next((RATINGS[word] for word in stars if word in RATINGS), 0),
        }


job = CrawlJob(BooksSpider, schema="book")
