"""Generate a books.toscrape-like static site: the crawl example's demo site and benchmark.

The shipped demo site (``jobs/site/``, 30 pages) was made with::

    python tests/support/make_site.py jobs/site --pages 30 --per-page 5 --pages-per-category 2

and the test/benchmark server (``tests/support/sites.py``, ``BookSite``) renders the same
pages in memory with the default layout (20 books a page, 10 pages a category).

Layout, for ``pages`` HTML pages in all (all links relative)::

    /index.html                                   home: the list of categories
    /catalogue/category/<slug>_<k>/page-<n>.html  a category's n-th page: ~20 books,
                                                  and ``li.next a`` to page n+1
    /catalogue/book_<n>/index.html                a book: title, price, availability, rating

Only the home page lists the categories (``ul.categories``), and each catalogue
page lists its own books and next page (breadcrumbs and "previous" links lead
back up), so a spider that follows the category list, the books and the next
links walks a tree: every page is reached once, at one depth (home 0, a
category's page n at depth n, its books at n + 1; at most 11 by default).
Everything is derived from the page count and layout, deterministically: two
renders of the same layout are byte-identical.
"""

from __future__ import annotations

import argparse
import html
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATEGORY_NAMES = [
    "Travel",
    "Mystery",
    "Historical Fiction",
    "Sequential Art",
    "Classics",
    "Philosophy",
    "Romance",
    "Science Fiction",
    "Poetry",
    "Fantasy",
    "Young Adult",
    "Science",
    "Art",
    "Psychology",
    "Humor",
    "Horror",
    "History",
    "Food and Drink",
    "Business",
    "Biography",
    "Thriller",
    "Short Stories",
    "Health",
    "Politics",
    "Crime",
]
RATINGS = ["One", "Two", "Three", "Four", "Five"]  # the class names books.toscrape uses


def _words(text: str) -> list[str]:
    return text.split()


ADJECTIVES = _words(
    "Silent Hidden Last Broken Golden Distant Quiet Wild Lost Burning Crimson "
    "Hollow Secret Frozen Wandering Little Bright Forgotten Salted Restless"
)
NOUNS = _words(
    "River Garden Harbor Letter Lantern Orchard Mountain Kingdom Map Winter "
    "Bridge Island Library Compass Forest Clockmaker Archive Lighthouse Meadow Voyage"
)
PEOPLE = _words("Keeper Cartographer Baker Night Nurse Astronomer Sister Beekeeper Ferryman")
LOREM = _words(
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure "
    "in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
    "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est"
)

STYLE = """\
body { font-family: Helvetica, Arial, sans-serif; margin: 0; color: #333; }
.header { background: #f6f3ea; padding: 10px 20px; }
.header a { color: #333; font-size: 1.6em; text-decoration: none; }
.page_inner { max-width: 1100px; margin: 0 auto; padding: 0 20px; }
.breadcrumb { list-style: none; padding: 8px 0; }
.breadcrumb li { display: inline; }
.breadcrumb li + li:before { content: "/ "; padding: 0 5px; color: #999; }
ol.row { list-style: none; padding: 0; display: flex; flex-wrap: wrap; }
ol.row li { width: 23%; margin: 0 1% 20px 1%; }
.product_pod { border: 1px solid #eee; padding: 10px; min-height: 200px; }
.thumb { display: block; height: 90px; background: #ddd; text-align: center; }
.price_color { color: #48a148; font-weight: bold; }
.star-rating { color: #e6c300; }
.pager { list-style: none; padding: 0; text-align: center; }
.pager li { display: inline; margin: 0 10px; }
.footer { border-top: 1px solid #eee; margin-top: 30px; padding: 10px 20px; color: #999; }
"""


@dataclass(frozen=True)
class Category:
    """A book category: its display name and URL slug (``travel_1``)."""

    number: int  # 1-based
    name: str
    slug: str


@dataclass(frozen=True)
class Book:
    """One book page's data."""

    number: int  # 1-based; the page is /catalogue/book_<number>/index.html
    title: str
    price: float  # pounds, two decimals
    stock: int  # copies in stock; 0 is "Out of stock"
    rating: int  # 1..5 stars
    upc: str
    description: str
    category: Category

    @property
    def path(self) -> str:
        """The book page's URL path."""
        return f"/catalogue/book_{self.number}/index.html"

    @property
    def availability(self) -> str:
        """The availability text as shown on the book page."""
        return f"In stock ({self.stock} available)" if self.stock else "Out of stock"

    def record(self) -> dict[str, Any]:
        """What the example spider yields for this book, less its ``url``."""
        return {
            "title": self.title,
            "price": self.price,
            "availability": self.availability,
            "rating": self.rating,
        }


@dataclass(frozen=True)
class CataloguePage:
    """One page of a category's book list."""

    category: Category
    number: int  # 1-based within the category
    count: int  # pages in the category
    books: tuple[int, ...]  # book numbers listed on this page

    @property
    def path(self) -> str:
        """The page's URL path."""
        return f"/catalogue/category/{self.category.slug}/page-{self.number}.html"


@dataclass(frozen=True)
class Layout:
    """The whole site: categories, catalogue pages and books."""

    categories: tuple[Category, ...]
    catalogue: tuple[CataloguePage, ...]
    books: tuple[Book, ...]

    @property
    def pages(self) -> int:
        """HTML pages a full crawl fetches: home + catalogue pages + book pages."""
        return 1 + len(self.catalogue) + len(self.books)


def slugify(name: str) -> str:
    """``"Food and Drink"`` → ``"food-and-drink"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_book(number: int, category: Category) -> Book:
    """The book with this number; deterministic (seeded by the number alone)."""
    rng = random.Random(f"fanout-book-{number}")
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    pattern = rng.randrange(6)
    if pattern == 0:
        title = f"The {adjective} {noun}"
    elif pattern == 1:
        title = f"{noun} of the {adjective} {rng.choice(NOUNS)}"
    elif pattern == 2:
        title = f"The {rng.choice(PEOPLE)}'s {noun}"  # an apostrophe
    elif pattern == 3:
        title = f"{noun} & {rng.choice(NOUNS)}"  # an ampersand, escaped in the HTML
    elif pattern == 4:
        title = f"A {adjective} {noun}: Stories from the {rng.choice(NOUNS)}"
    else:
        title = f"{adjective} {noun}, Vol. {rng.randint(1, 9)}"
    words = [rng.choice(LOREM) for _ in range(rng.randint(70, 110))]
    description = " ".join(words).capitalize() + "."
    return Book(
        number=number,
        title=title,
        price=float(f"{rng.uniform(10, 60):.2f}"),
        stock=rng.choice([0, *range(1, 23)]),
        rating=rng.randint(1, 5),
        upc=f"{rng.getrandbits(64):016x}",
        description=description,
        category=category,
    )


def layout(pages: int, per_page: int = 20, pages_per_category: int = 10) -> Layout:
    """The site with exactly ``pages`` HTML pages (home, catalogue pages, books).

    Catalogue pages list ``per_page`` books (the last few one fewer) and are
    grouped ``pages_per_category`` to a category, in order.
    """
    if pages < 3:
        raise ValueError("a book site needs at least 3 pages (home, a catalogue page, a book)")
    if per_page < 1 or pages_per_category < 1:
        raise ValueError("per_page and pages_per_category must be positive")
    n_catalogue = math.ceil((pages - 1) / (per_page + 1))
    n_books = pages - 1 - n_catalogue
    n_categories = math.ceil(n_catalogue / pages_per_category)
    categories = []
    for index in range(n_categories):
        base = CATEGORY_NAMES[index % len(CATEGORY_NAMES)]
        cycle = index // len(CATEGORY_NAMES)
        name = base if cycle == 0 else f"{base} {cycle + 1}"
        categories.append(Category(index + 1, name, f"{slugify(name)}_{index + 1}"))
    base_count, extra = divmod(n_books, n_catalogue)
    catalogue: list[CataloguePage] = []
    books: list[Book] = []
    for index in range(n_catalogue):
        category = categories[index // pages_per_category]
        first_page = (index // pages_per_category) * pages_per_category
        in_category = min(pages_per_category, n_catalogue - first_page)
        count = base_count + (1 if index < extra else 0)
        numbers = tuple(range(len(books) + 1, len(books) + count + 1))
        books.extend(make_book(number, category) for number in numbers)
        catalogue.append(CataloguePage(category, index - first_page + 1, in_category, numbers))
    return Layout(tuple(categories), tuple(catalogue), tuple(books))


def expected_books(
    pages: int, per_page: int = 20, pages_per_category: int = 10
) -> dict[str, dict[str, Any]]:
    """URL path → the record the example spider yields for it (less ``url``)."""
    return {book.path: book.record() for book in layout(pages, per_page, pages_per_category).books}


# --- rendering ---------------------------------------------------------------------------


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _stars(rating: int) -> str:
    icons = '<i class="icon-star"></i>' * 5
    return f'<p class="star-rating {RATINGS[rating - 1]}">{icons}</p>'


def _page(title: str, root: str, breadcrumb: list[tuple[str, str | None]], body: str) -> bytes:
    crumbs = "".join(
        f'<li><a href="{href}">{_e(text)}</a></li>'
        if href
        else f'<li class="active">{_e(text)}</li>'
        for text, href in breadcrumb
    )
    return f"""<!DOCTYPE html>
<html lang="en-us" class="no-js">
<head>
  <meta charset="utf-8">
  <title>{_e(title)} | Books to Scrape - Sandbox</title>
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="description" content="{_e(title)}">
  <style>
{STYLE}  </style>
</head>
<body id="default" class="default">
  <header class="header container-fluid">
    <div class="page_inner">
      <div class="row">
        <div class="col-sm-8 h1"><a href="{root}index.html">Books to Scrape</a>
          <small> We love being scraped!</small></div>
      </div>
    </div>
  </header>
  <div class="container-fluid page">
    <div class="page_inner">
      <ul class="breadcrumb">{crumbs}</ul>
{body}
    </div>
  </div>
  <footer class="footer container-fluid">
    <p>A generated sandbox for the fanout crawl example. Prices and ratings are made up.</p>
  </footer>
</body>
</html>
""".encode()


def render_home(site: Layout) -> bytes:
    """The home page: a list of the categories, each linking to its first page."""
    counts: dict[int, int] = {}
    for page in site.catalogue:
        counts[page.category.number] = counts.get(page.category.number, 0) + len(page.books)
    items = "\n".join(
        f'          <li><a href="catalogue/category/{c.slug}/page-1.html">{_e(c.name)}</a>'
        f" <span>({counts.get(c.number, 0)})</span></li>"
        for c in site.categories
    )
    body = f"""      <div class="row">
        <div class="page-header action"><h1>All categories</h1></div>
        <p>{len(site.books):,} books in {len(site.categories)} categories.</p>
        <ul class="nav nav-list categories">
{items}
        </ul>
      </div>"""
    return _page("All categories", "", [("Home", None)], body)


def render_catalogue(site: Layout, page: CataloguePage) -> bytes:
    """A category page: its books as product pods, and a pager."""
    pods = []
    for number in page.books:
        book = site.books[number - 1]
        short = book.title if len(book.title) <= 40 else book.title[:37] + "..."
        href = f"../../book_{book.number}/index.html"
        in_stock = "instock" if book.stock else "outofstock"
        short_stock = "In stock" if book.stock else "Out of stock"
        pods.append(f"""          <li class="col-xs-6 col-sm-4 col-md-3 col-lg-3">
            <article class="product_pod">
              <div class="image_container">
                <a href="{href}"><span class="thumb">{book.number}</span></a>
              </div>
              {_stars(book.rating)}
              <h3><a href="{href}" title="{_e(book.title)}">{_e(short)}</a></h3>
              <div class="product_price">
                <p class="price_color">£{book.price:.2f}</p>
                <p class="{in_stock} availability">{short_stock}</p>
                <form>
                  <button type="submit" class="btn btn-primary btn-block">Add to basket</button>
                </form>
              </div>
            </article>
          </li>""")
    pager = [f'<li class="current">Page {page.number} of {page.count}</li>']
    if page.number > 1:
        pager.insert(
            0, f'<li class="previous"><a href="page-{page.number - 1}.html">previous</a></li>'
        )
    if page.number < page.count:
        pager.append(f'<li class="next"><a href="page-{page.number + 1}.html">next</a></li>')
    body = f"""      <div class="page-header action"><h1>{_e(page.category.name)}</h1></div>
      <form class="form-horizontal"><strong>{len(page.books)}</strong> results on this page.</form>
      <section>
        <ol class="row">
{chr(10).join(pods)}
        </ol>
        <div><ul class="pager">{"".join(pager)}</ul></div>
      </section>"""
    crumbs = [("Home", "../../../index.html"), (page.category.name, None)]
    return _page(f"{page.category.name} - page {page.number}", "../../../", crumbs, body)


def render_book(book: Book) -> bytes:
    """A book page: the product block, description and information table."""
    in_stock = "instock" if book.stock else "outofstock"
    icon = "icon-ok" if book.stock else "icon-remove"
    body = f"""      <article class="product_page">
        <div class="row">
          <div class="col-sm-6"><span class="thumb">{book.number}</span></div>
          <div class="col-sm-6 product_main">
            <h1>{_e(book.title)}</h1>
            <p class="price_color">£{book.price:.2f}</p>
            <p class="{in_stock} availability">
              <i class="{icon}"></i>
              {book.availability}
            </p>
            {_stars(book.rating)}
          </div>
        </div>
        <div id="product_description" class="sub-header"><h2>Product Description</h2></div>
        <p>{_e(book.description)}</p>
        <div class="sub-header"><h2>Product Information</h2></div>
        <table class="table table-striped">
          <tr><th>UPC</th><td>{book.upc}</td></tr>
          <tr><th>Product Type</th><td>Books</td></tr>
          <tr><th>Price (excl. tax)</th><td>£{book.price:.2f}</td></tr>
          <tr><th>Price (incl. tax)</th><td>£{book.price:.2f}</td></tr>
          <tr><th>Tax</th><td>£0.00</td></tr>
          <tr><th>Availability</th><td>{book.availability}</td></tr>
          <tr><th>Number of reviews</th><td>0</td></tr>
        </table>
      </article>"""
    crumbs = [
        ("Home", "../../index.html"),
        (book.category.name, f"../category/{book.category.slug}/page-1.html"),
        (book.title, None),
    ]
    return _page(book.title, "../../", crumbs, body)


def render_site(site: Layout) -> dict[str, bytes]:
    """URL path → page body, for every page (the home page as ``/index.html``)."""
    bodies = {"/index.html": render_home(site)}
    for page in site.catalogue:
        bodies[page.path] = render_catalogue(site, page)
    for book in site.books:
        bodies[book.path] = render_book(book)
    return bodies


def write_site(directory: Path, pages: int, per_page: int, pages_per_category: int) -> int:
    """Write the site's pages under ``directory``; returns the bytes written."""
    total = 0
    for path, body in render_site(layout(pages, per_page, pages_per_category)).items():
        target = directory / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        total += len(body)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a books.toscrape-like static site.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--pages", type=int, default=30, help="HTML pages in all")
    parser.add_argument("--per-page", type=int, default=20, help="books per catalogue page")
    parser.add_argument("--pages-per-category", type=int, default=10)
    args = parser.parse_args()
    size = write_site(args.directory, args.pages, args.per_page, args.pages_per_category)
    print(f"wrote {args.pages} pages, {size:,} bytes, in {args.directory}")


if __name__ == "__main__":
    main()
