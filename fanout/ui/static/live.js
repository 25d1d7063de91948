// Live updates without a reload: fetch this page's live URL once a second
// (at most), put the server-rendered (escaped) fragments in place, stop when
// the run has ended. No strings from a job are ever evaluated here.
(function () {
  "use strict";
  var url = document.body.getAttribute("data-live-url");
  if (!url) { return; }
  var version = document.body.getAttribute("data-live-version") || "";
  function schedule(ms) { window.setTimeout(tick, ms); }
  function tick() {
    var sep = url.indexOf("?") < 0 ? "?" : "&";
    fetch(url + sep + "v=" + encodeURIComponent(version), {
      credentials: "same-origin", headers: { "Accept": "application/json" }
    }).then(function (r) { return r.ok ? r.json() : null; }).then(function (data) {
      if (!data) { schedule(5000); return; }
      Object.keys(data.html).forEach(function (id) {
        var el = document.getElementById(id);
        if (el) { el.innerHTML = data.html[id]; }
      });
      if (data.v) { version = data.v; }
      if (!data.done) { schedule(1000); }
    }).catch(function () { schedule(5000); });
  }
  schedule(1000);
})();
