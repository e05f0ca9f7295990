// The ISDP dashboard: renders the snapshots the control plane pushes over
// one EventSource (/ui/events). Plain DOM, no library; text is always set
// with textContent, never parsed as HTML.
'use strict';

(function () {
  const PAGE = 50; // services per page
  let snap = null;
  let page = 0;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function table(target, head, rows) {
    const t = $(target);
    t.replaceChildren(el('tr', {}, ...head.map((h) => el('th', {}, h))), ...rows);
  }

  const health = (s) => (s || 'HEALTH_STATUS_UNKNOWN').replace('HEALTH_STATUS_', '').toLowerCase();
  const time = (ms) => (ms ? new Date(Number(ms)).toLocaleTimeString() : '');
  const pct = (x) => (100 * x).toFixed(x > 0 && x < 0.01 ? 2 : 1) + '%';
  const rate = (x) => (x >= 10 ? x.toFixed(0) : x.toFixed(2));

  // --- tabs -------------------------------------------------------------
  function showTab() {
    const want = (location.hash || '#topology').slice(1);
    for (const s of document.querySelectorAll('section.tab')) s.hidden = s.id !== want;
    for (const a of document.querySelectorAll('nav a')) {
      a.classList.toggle('active', a.getAttribute('href') === '#' + want);
    }
  }

  // --- services ---------------------------------------------------------
  function matches(service, q) {
    if (!q) return true;
    if (service.name.includes(q)) return true;
    return service.instances.some(
      (i) => i.id.includes(q) || Object.entries(i.metadata || {}).some(([k, v]) => k.includes(q) || v.includes(q)),
    );
  }

  function renderServices() {
    const q = $('filter').value.trim().toLowerCase();
    const shown = snap.services.filter((s) => matches(s, q));
    const pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    const prev = el('button', { id: 'prev', type: 'button' }, '‹');
    const next = el('button', { id: 'next', type: 'button' }, '›');
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
    prev.onclick = () => { page -= 1; renderServices(); };
    next.onclick = () => { page += 1; renderServices(); };
    $('pager').replaceChildren(
      prev, ` page ${page + 1} of ${pages} (${shown.length} of ${snap.services.length} services) `, next,
    );
    const list = shown.slice(page * PAGE, (page + 1) * PAGE).map((s) => {
      const rows = s.instances.map((i) => {
        const h = health(i.status);
        const meta = Object.entries(i.metadata || {})
          .filter(([k]) => k !== 'zone')
          .map(([k, v]) => `${k}=${v}`)
          .join(' ');
        return el(
          'tr',
          { 'data-instance': i.id, 'data-status': h },
          el('td', {}, i.id),
          el('td', {}, `${i.address}:${i.port}`),
          el('td', { class: 'health ' + h }, h),
          el('td', {}, i.zone || (i.metadata || {}).zone || ''),
          el('td', { class: 'priority' }, i.priority || 0),
          el('td', { class: 'weight' }, i.weight || 1),
          el('td', {}, i.nodeId ? `sidecar ${i.nodeId}` : 'operator'),
          el('td', { class: 'meta' }, meta),
        );
      });
      const healthy = s.instances.filter((i) => health(i.status) !== 'unhealthy').length;
      return el(
        'div',
        { class: 'service', 'data-service': s.name },
        el('h3', {}, s.name, el('span', { class: 'count' }, ` ${healthy}/${s.instances.length} routable`)),
        rows.length
          ? el(
            'table', { class: 'grid' },
            el('tr', {}, ...['Instance', 'Address', 'Health', 'Zone', 'Priority', 'Weight', 'Registered by', 'Metadata']
              .map((h) => el('th', {}, h))),
            ...rows,
          )
          : el('p', { class: 'hint' }, 'no instances'),
      );
    });
    $('services-list').replaceChildren(...list);
  }

  // --- sidecars ---------------------------------------------------------
  function renderProxies() {
    const rows = snap.proxies.map((p) => {
      const types = (p.types || []).map((t) => {
        const short = t.typeUrl.split('/').pop().split('.').pop();
        const versions = new Set(Object.values(t.acked || {}));
        const names = Object.keys(t.acked || {}).length;
        const nack = t.lastNack ? el('div', { class: 'nack' }, `NACK: ${t.lastNack}`) : null;
        return el(
          'div', { class: 'type', 'data-type': short },
          `${short}: ${names} acked (${[...versions].map((v) => v.slice(0, 8)).join(', ') || '—'}), `
            + `${t.acks || 0} ACKs, ${t.nacks || 0} NACKs${t.pending ? ', pending' : ''}`,
          nack,
        );
      });
      return el(
        'tr', { 'data-node': p.nodeId },
        el('td', {}, p.nodeId),
        el('td', {}, `${p.userAgentName || (p.kind || '').replace('CLIENT_KIND_', '').toLowerCase()} ${p.userAgentVersion || ''}`),
        el('td', {}, p.principal),
        el('td', {}, p.zone || ''),
        el('td', {}, p.delta ? 'delta' : 'sotw'),
        el('td', {}, time(p.connectedAtUnixMs)),
        el('td', {}, ...types),
      );
    });
    table('proxies', ['Node', 'Client', 'Principal', 'Zone', 'Protocol', 'Connected', 'Resources'], rows);
  }

  // --- policies and rules -----------------------------------------------
  function renderPolicies() {
    const docs = snap.policies.map((p) => el(
      'article', { class: 'doc', 'data-policy': p.service },
      el('h3', {}, p.service, el('span', { class: 'count' }, ` version ${p.version}`)),
      el('pre', {}, JSON.stringify(p.document, null, 2)),
    ));
    $('policies-list').replaceChildren(...(docs.length ? docs : [el('p', { class: 'hint' }, 'no traffic policies')]));
  }

  function renderAuthz() {
    const a = snap.authorization;
    const byDest = new Map();
    for (const r of a.rules) {
      if (!byDest.has(r.destination)) byDest.set(r.destination, []);
      byDest.get(r.destination).push(r);
    }
    const docs = [...byDest.entries()].map(([dest, rules]) => el(
      'article', { class: 'doc', 'data-destination': dest },
      el('h3', {}, `calls to ${dest}`),
      el('pre', {}, rules.map((r) => [
        `${r.name}: ${(r.action || 'ACTION_ALLOW').replace('ACTION_', '').toLowerCase()}`,
        `  from    ${(r.sources || []).join(', ')}`,
        `  methods ${(r.methods || []).join(', ') || 'any'}`,
        `  paths   ${r.pathPrefix || 'any'}`,
      ].join('\n')).join('\n\n')),
    ));
    $('authz').replaceChildren(
      el('p', { id: 'authz-default' }, 'Default for calls no rule matches: ',
        el('strong', {}, a.default.replace('ACTION_', '').toLowerCase())),
      ...docs,
    );
  }

  function renderTransitions() {
    const rows = snap.transitions.map((t) => el(
      'tr', { 'data-instance': t.instance },
      el('td', {}, time(t.atUnixMs)),
      el('td', {}, t.service),
      el('td', {}, t.instance),
      el('td', { class: 'health ' + (t.from ? health(t.from) : 'none') }, t.from ? health(t.from) : 'registered'),
      el('td', { class: 'health ' + (t.to ? health(t.to) : 'none') }, t.to ? health(t.to) : 'removed'),
    ));
    table('transitions-list', ['Time', 'Service', 'Instance', 'From', 'To'], rows);
  }

  // --- topology -----------------------------------------------------------
  // Layered layout: a service's column is the longest caller chain above
  // it (cycles cut after as many rounds as there are services), rows in
  // name order. Edges are drawn left to right, labelled at their middle.
  function renderTopology() {
    const edges = snap.edges;
    const names = [...new Set(edges.flatMap((e) => [e.caller, e.callee]))].sort();
    const depth = new Map(names.map((n) => [n, 0]));
    for (let round = 0; round < names.length; round++) {
      let moved = false;
      for (const e of edges) {
        if (e.caller === e.callee) continue;
        const d = depth.get(e.caller) + 1;
        if (d > depth.get(e.callee) && d < names.length) { depth.set(e.callee, d); moved = true; }
      }
      if (!moved) break;
    }
    const columns = [];
    for (const n of names) (columns[depth.get(n)] ||= []).push(n);
    const W = 400, H = 70, NW = 150, NH = 30;
    const pos = new Map();
    columns.forEach((col, c) => col.forEach((n, r) => pos.set(n, { x: 20 + c * W, y: 40 + r * H })));
    const g = $('graph');
    const width = 40 + Math.max(1, columns.length) * W;
    const height = 60 + Math.max(1, ...columns.map((c) => c.length)) * H;
    g.setAttribute('viewBox', `0 0 ${width} ${height}`);
    g.setAttribute('width', width);
    g.setAttribute('height', height);
    const defs = svg('defs');
    const marker = svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' });
    marker.append(svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrowhead' }));
    defs.append(marker);
    const parts = [defs];
    for (const e of edges) {
      const a = pos.get(e.caller), b = pos.get(e.callee);
      const x1 = a.x + NW, y1 = a.y + NH / 2, x2 = b.x, y2 = b.y + NH / 2;
      const bad = e.errorRate > 0.01;
      const d = e.caller === e.callee
        ? `M ${x1} ${y1} C ${x1 + 40} ${y1 - 40}, ${a.x - 40} ${y1 - 40}, ${x2} ${y2}`
        : `M ${x1} ${y1} C ${x1 + 50} ${y1}, ${x2 - 50} ${y2}, ${x2} ${y2}`;
      const group = svg('g', { class: 'edge' + (bad ? ' errors' : ''), 'data-edge': `${e.caller}->${e.callee}` });
      group.append(svg('path', { d, 'marker-end': 'url(#arrow)' }));
      const label = `${rate(e.rps)} rps · ${pct(e.errorRate)} err` + (e.p99Ms != null ? ` · p99 ≤${e.p99Ms} ms` : '');
      group.append(svg('text', { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, 'text-anchor': 'middle' }, label));
      parts.push(group);
    }
    for (const [n, p] of pos) {
      const node = svg('g', { class: 'node', 'data-node': n });
      node.append(svg('rect', { x: p.x, y: p.y, width: NW, height: NH, rx: 6 }));
      node.append(svg('text', { x: p.x + NW / 2, y: p.y + NH / 2 + 5, 'text-anchor': 'middle' }, n));
      parts.push(node);
    }
    if (!edges.length) parts.push(svg('text', { x: 20, y: 30, class: 'hint' }, 'no traffic reported yet'));
    g.replaceChildren(...parts);
    table('edges', ['Caller', 'Callee', 'Requests/s', 'Errors', 'p99'], edges.map((e) => el(
      'tr', { 'data-edge': `${e.caller}->${e.callee}`, 'data-rps': e.rps },
      el('td', {}, e.caller), el('td', {}, e.callee), el('td', {}, rate(e.rps)),
      el('td', { class: e.errorRate > 0.01 ? 'health unhealthy' : '' }, pct(e.errorRate)),
      el('td', {}, e.p99Ms != null ? `≤ ${e.p99Ms} ms` : '—'),
    )));
  }

  function render() {
    if (!snap) return;
    renderTopology();
    renderServices();
    renderProxies();
    renderPolicies();
    renderAuthz();
    renderTransitions();
  }

  // --- live updates -------------------------------------------------------
  function connect() {
    const es = new EventSource('/ui/events');
    es.addEventListener('snapshot', (e) => {
      snap = JSON.parse(e.data);
      $('status').textContent = 'live · updated ' + new Date().toLocaleTimeString();
      $('status').className = 'status live';
      render();
    });
    es.addEventListener('ended', () => {
      es.close();
      location.href = '/ui/login';
    });
    es.onerror = () => {
      $('status').textContent = 'reconnecting…';
      $('status').className = 'status down';
      if (es.readyState === EventSource.CLOSED) {
        // Refused (no session, or too many streams): find out which.
        fetch('/ui/', { redirect: 'manual' }).then((r) => {
          if (r.type === 'opaqueredirect' || r.status === 401) location.href = '/ui/login';
          else setTimeout(connect, 3000);
        }, () => setTimeout(connect, 3000));
      }
    };
  }

  window.addEventListener('hashchange', showTab);
  document.addEventListener('DOMContentLoaded', () => {
    showTab();
    $('filter').addEventListener('input', () => { page = 0; if (snap) renderServices(); });
    connect();
  });
})();
