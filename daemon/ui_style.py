"""The status page's stylesheet and the headers that go with every page.

The stylesheet is the pages' only inline code: the Content-Security-Policy allows it by
its SHA-256 hash and allows nothing else (no script, no style attribute, nothing loaded
from anywhere), so editing it can never break the policy. Colours of the statuses come
from custom properties, used by the bars' and the chart's SVG classes alike. Under
760 px wide (a phone) tables turn into cards and the chart's text grows to stay
readable as the chart shrinks.
"""

from __future__ import annotations

import base64
import hashlib

CSS = """
:root{--fg:#1d2430;--muted:#5d6778;--line:#dfe3ea;--bg:#f5f7fa;--card:#fff;
--ok:#2b8a3e;--warn:#e67700;--bad:#c92a2a;--link:#1c5fb8;
--delivered:#2f9e44;--not_delivered:#f08c00;--failed:#e03131;--waiting:#74c0fc;
--unknown:#9775fa;--expired:#adb5bd}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
a{color:var(--link);text-decoration:none}a:hover{text-decoration:underline}
main{max-width:1240px;margin:0 auto;padding:16px 20px 40px}
header.top{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px;margin-bottom:12px}
h1{font-size:22px;margin:0}h2{font-size:17px;margin:24px 0 10px}
.muted{color:var(--muted);font-size:13px}
h1 .mono{font-size:inherit}
code,.mono{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace;
font-size:13px}
.banner{border-radius:8px;padding:10px 14px;margin:0 0 12px;font-weight:600}
.banner.bad{background:#fff0f0;border:1px solid #ffc9c9;color:var(--bad)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card h3{margin:0 0 4px;font-size:12px;font-weight:600;color:var(--muted);
text-transform:uppercase;letter-spacing:.04em}
.card .big{font-size:20px;font-weight:650}
.card ul{margin:4px 0 0;padding-left:18px}
.ok{color:var(--ok)}.warn{color:var(--warn)}.bad{color:var(--bad)}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
background:#e9ecef;color:#343a40;white-space:nowrap}
.badge.active{background:#d0ebff;color:#1864ab}.badge.completed{background:#d3f9d8;color:#2b8a3e}
.badge.expired{background:#e9ecef;color:#495057}.badge.untracked{background:#f1f3f5;color:#868e96}
.badge.o-ok{background:#d3f9d8;color:#2b8a3e}.badge.o-api_error,.badge.o-transient_error{
background:#fff3bf;color:#a05a00}.badge.o-auth_error{background:#ffe3e3;color:#c92a2a}
.chips{display:flex;flex-wrap:wrap;gap:4px 10px;margin-top:4px}.chip{white-space:nowrap}
table{width:100%;border-collapse:collapse;background:var(--card);border:1px solid var(--line);
border-radius:8px;overflow:hidden}
th,td{padding:7px 10px;text-align:left;border-bottom:1px solid var(--line);vertical-align:middle}
th{font-size:12px;color:var(--muted);font-weight:600;background:#fafbfc;white-space:nowrap}
tbody tr:last-child td{border-bottom:none}tbody tr:hover{background:#f8fafc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.tag{font-weight:600;word-break:break-all;min-width:90px}
td.barcell{width:30%;min-width:140px}
td.when{white-space:nowrap;font-variant-numeric:tabular-nums}
.sub{display:block;color:var(--muted);font-size:12px}.sub.bad{color:var(--bad)}
svg.bar{display:block;width:100%;height:14px;border-radius:3px;background:#eef1f5}
svg.bar.big{height:22px}
.s-delivered{fill:var(--delivered)}.s-not_delivered{fill:var(--not_delivered)}
.s-failed{fill:var(--failed)}.s-waiting{fill:var(--waiting)}.s-unknown{fill:var(--unknown)}
.s-expired{fill:var(--expired)}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px;color:var(--muted);margin:6px 0}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
i.k-delivered{background:var(--delivered)}i.k-not_delivered{background:var(--not_delivered)}
i.k-failed{background:var(--failed)}i.k-waiting{background:var(--waiting)}
i.k-unknown{background:var(--unknown)}i.k-expired{background:var(--expired)}
i.k-final{background:#1c5fb8}.curve-legend b{color:var(--fg)}
.pager{display:flex;justify-content:space-between;align-items:center;margin:10px 2px;gap:10px}
.chart{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px;
overflow-x:auto}
.chart svg{display:block;width:100%;max-width:980px;height:auto}
.chart text.tick{dominant-baseline:hanging}
.chart text{font-size:13px;fill:var(--muted)}.chart .axis{stroke:#868e96;stroke-width:1}
.chart .grid{stroke:#e9ecef;stroke-width:1}
.chart .l-final{fill:none;stroke:#1c5fb8;stroke-width:2.5}
.chart .l-delivered{fill:none;stroke:var(--delivered);stroke-width:2.5}
.chart .a-delivered{fill:var(--delivered);opacity:.12}
.chart .key-final,.chart .d-final{fill:#1c5fb8}
.chart .key-delivered,.chart .d-delivered{fill:var(--delivered)}
table.milestones{max-width:460px;margin-top:10px}
.err{color:var(--bad);font-size:13px;word-break:break-word}.card .err{display:block}
footer{margin-top:28px;color:var(--muted);font-size:12px}
@media (max-width:760px){
main{padding:10px 10px 30px}h1{font-size:19px}
.cards{grid-template-columns:1fr 1fr;gap:8px}
.card{padding:8px 10px;min-width:0;overflow-wrap:anywhere}.card .big{font-size:17px}
table.stack,table.stack tbody{display:block}
table.stack thead{display:none}
table.stack tr{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:6px 10px;
padding:10px 12px;border-bottom:1px solid var(--line)}
table.stack td{display:block;border:none;padding:0;text-align:left;min-width:0}
table.stack td[data-label]::before{content:attr(data-label);display:block;color:var(--muted);
font-size:11px;font-weight:600;text-transform:uppercase;letter-spacing:.03em}
table.stack td.tag,table.stack td.barcell,table.stack td.wide{grid-column:1/-1}
table.stack td.tag::before,table.stack td.barcell::before{display:none}
table.stack td.tag{font-size:16px}
table.stack td.wide:empty{display:none}
.chart{padding:4px}.chart text{font-size:28px}.chart text.minor{display:none}
table.stack td.when{white-space:normal}table.stack td.barcell{width:auto}
}
"""

#: The Content-Security-Policy of every page: nothing may load from anywhere (no
#: script, font, frame or connection), the inline stylesheet is allowed by its hash,
#: images only as ``data:`` (the empty favicon), forms only to this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()}'; "
    "img-src data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Headers that go with every page (:mod:`daemon.http` adds them to the answer).
PAGE_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
CONTENT_TYPE = "text/html; charset=utf-8"
